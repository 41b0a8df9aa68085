"""A TCP proxy of the tests' own, on loopback: it adds latency, or cuts every connection
and refuses new ones, so a test can put a slow or broken network between two parts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import Self

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target` until closed."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self.latency_s = 0.0
        self._cut = False
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        self._drop_all()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    def cut(self) -> None:
        """Break every connection and refuse new ones, like a network that went away."""
        self._cut = True
        self._drop_all()

    def restore(self) -> None:
        self._cut = False

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        if self._cut:
            client_out.transport.abort()
            return
        try:
            server_in, server_out = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            client_out.transport.abort()
            return
        if self._cut:  # cut while this connection was being made
            client_out.transport.abort()
            server_out.transport.abort()
            return
        self._writers |= {client_out, server_out}
        for source, sink in ((client_in, server_out), (server_in, client_out)):
            pipe = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk held back by the latency of its arrival time."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    sink.close()
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                sink.write(data)
                await sink.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await source.read(_CHUNK):
                await queue.put((time.monotonic() + self.latency_s, data))
            await queue.put((0.0, b""))
            await delivering
        except (ConnectionError, OSError):
            sink.transport.abort()
        finally:
            delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await delivering
            self._writers.discard(sink)
