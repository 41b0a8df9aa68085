"""A bridge worker process: decodes, validates and produces the readings of its devices.

The bridge's session process starts `python -m gateway.services.bridge.worker FD NUMBER`
with the settings in its environment and one end of a socket pair as FD. Over it, frames
go both ways (a 4-byte length, then a `marshal`led tuple of plain values):

- to the worker: `("messages", received_at_ms, [(index, topic, payload, size), ...])`,
  every message of the devices this worker owns, in arrival order (`size` is the
  payload's, larger than `payload` when only its first bytes were kept), and
  `("discovery", topic, payload)`, each Home Assistant discovery config, to every worker
  before any message that follows it;
- to the session: `("ready",)` once the registry is loaded and Kafka answers, or
  `("error", reason)` and exit 1; then `("done", [index, ...], stats)` as Kafka
  acknowledges messages, `stats` a dict of what happened since the last frame (readings,
  published, rejected by reason, Kafka retries, newest ts, readings by source, ignored
  fields by (source, field), availability records, availability messages ignored by
  reason, messages held, pending devices).

End of input (the session closed its end, or died) stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import marshal
import signal
import socket
import struct
import sys
from typing import Any

import structlog
import uvloop
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from gateway.adapters.kafka import create_producer, started
from gateway.domain.pending import PendingBook
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.sources import Sources
from gateway.domain.validation import ReadingValidator
from gateway.errors import IotgwError
from gateway.services.bridge.pending import PendingDevices, Queued
from gateway.services.bridge.publisher import BATCH_BYTES, KafkaPublisher
from gateway.services.bridge.routing import device_of, worker_of
from gateway.services.registry import DeviceRegistry
from gateway.services.runtime import service_logging, tune_gc
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from schemas.types import TypeCatalogue

__all__ = ["IngestWorker", "read_frame", "write_frame"]

log = structlog.get_logger(__name__)

_LENGTH = struct.Struct("!I")
# Seconds a stopping worker waits for Kafka to acknowledge what it still holds.
_STOP_TIMEOUT_S = 2.0


def write_frame(writer: asyncio.StreamWriter, frame: tuple[Any, ...]) -> None:
    data = marshal.dumps(frame)
    writer.write(_LENGTH.pack(len(data)) + data)


async def read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next frame, or None at the end of input."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        frame = marshal.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    assert isinstance(frame, tuple)
    return frame


class IngestWorker:
    """The devices' half of the bridge: registry view, validation, rate limit, Kafka."""

    def __init__(
        self,
        settings: Settings,
        writer: asyncio.StreamWriter,
        sources: Sources,
        catalogue: TypeCatalogue,
        number: int = 0,
    ) -> None:
        self.settings = settings
        self._writer = writer
        self._number = number
        self.registry = DeviceRegistry(settings)
        workers = settings.bridge_workers
        self.validator = ReadingValidator(
            self.registry.get,
            require_registration=settings.require_registration,
            max_age_ms=int(settings.max_reading_age_s * 1000),
            limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst),
            sources=sources,
            catalogue=catalogue,
            default_tz=settings.default_tz,
            pending=PendingBook(),
            unknown_devices=settings.unknown_devices,
            # The limit is the whole bridge's: each worker holds its share of the devices.
            pending_max_devices=-(-settings.pending_max_devices // workers),
        )
        self._producer: AIOKafkaProducer | None = None
        self.pending: PendingDevices | None = None
        self._publisher: KafkaPublisher | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._done: list[int] = []
        self._readings = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Load the registry and start the producer; IotgwError if Kafka does not answer."""
        await self.registry.start()
        self._producer = await started(
            create_producer(self.settings, max_batch_size=BATCH_BYTES), self.settings
        )
        try:
            self._publisher = await KafkaPublisher.create(
                self._producer, Topics(self.settings.topic_prefix), self._finished
            )
        except KafkaError as exc:
            raise IotgwError(f"cannot read the topics' partitions: {exc}") from None
        self._publishing = asyncio.create_task(self._publisher.run(), name="kafka-publisher")
        workers = self.settings.bridge_workers
        self.pending = PendingDevices(
            self.settings,
            lambda device_id: worker_of(device_id, workers) == self._number,
            self.validator,
            self.registry,
            self._producer,
            self._publisher,
            self.validator.sources.auto_approving,
            self._resubmit,
        )
        await self.pending.start()
        # Everything loaded so far (registry, schemas, libraries) lives as long as the
        # process: keep it out of the collector's full scans, which at high rates
        # otherwise cost more than the readings themselves.
        gc.freeze()

    @property
    def publishing(self) -> asyncio.Task[None]:
        """The publisher's task: it ends only with an error (Kafka refused for good)."""
        assert self._publishing is not None, "not started"
        return self._publishing

    def handle(self, received_at: int, messages: list[tuple[int, str, bytes, int]]) -> None:
        """Judge each message's readings and queue them for Kafka, in arrival order."""
        publisher, pending = self._publisher, self.pending
        assert publisher is not None
        assert pending is not None
        process = self.validator.process
        draining, sources = pending.draining, self.validator.sources
        for index, topic, payload, size in messages:
            if draining and (device := device_of(topic, sources)) in draining:
                # Its last held messages are being replayed: it waits, unacknowledged.
                draining[device].append((index, topic, payload, size, received_at))
                continue
            outcomes = process(topic, payload, received_at, size)
            self._readings += len(outcomes)
            publisher.submit(outcomes, index)
        if publisher.pending:
            self._idle.clear()

    def _resubmit(self, queued: list[Queued]) -> None:
        """Messages kept aside during a replay, judged now in their order."""
        publisher = self._publisher
        assert publisher is not None
        for index, topic, payload, size, received_at in queued:
            outcomes = self.validator.process(topic, payload, received_at, size)
            self._readings += len(outcomes)
            publisher.submit(outcomes, index)
        if publisher.pending:
            self._idle.clear()

    def discovered(self, topic: str, payload: bytes) -> None:
        """A Home Assistant discovery config, as the session read it."""
        homeassistant = self.validator.sources.homeassistant
        if homeassistant is not None:
            homeassistant.learn(topic, payload)

    def _finished(self, index: int) -> None:
        if index < 0:
            assert self.pending is not None
            self.pending.finished(index)  # a replayed held message, not an MQTT one
            return
        if not self._done:
            asyncio.get_running_loop().call_soon(self._report)
        self._done.append(index)

    def _report(self) -> None:
        """One frame for every message finished in this turn of the loop."""
        assert self._publisher is not None
        stats = self._publisher.take_stats()
        done, self._done = self._done, []
        readings, self._readings = self._readings, 0
        by_source, ignored, presence_ignored = self.validator.take_counts()
        counts = {
            "readings": readings,
            "published": stats.published,
            "rejected": dict(stats.rejected),
            "retries": stats.retries,
            "newest_ts": stats.newest_ts,
            "sources": by_source,
            "ignored": ignored,
            "availability": stats.availability,
            "availability_ignored": presence_ignored,
            "held": stats.held,
            "pending_devices": len(self.validator.pending or ()),
        }
        with contextlib.suppress(ConnectionError):
            write_frame(self._writer, ("done", done, counts))
        if not self._publisher.pending:
            self._idle.set()

    async def stop(self) -> None:
        """Give Kafka a moment for what is pending, then close."""
        if self.pending is not None:
            await self.pending.stop()
        if self._publishing is not None and not self._publishing.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), _STOP_TIMEOUT_S)
            self._publishing.cancel()
            await asyncio.gather(self._publishing, return_exceptions=True)
        if self._producer is not None:
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(self._producer.stop(), _STOP_TIMEOUT_S)
        await self.registry.stop()


async def serve(fd: int) -> int:
    """Work for the session at the other end of socket `fd` until it closes; the exit code."""
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    try:
        settings = load_settings()
        service_logging(settings.log_format)
        worker = IngestWorker(
            settings, writer, settings.sources(), settings.catalogue(), int(sys.argv[2])
        )
        await worker.start()
    except IotgwError as exc:
        write_frame(writer, ("error", str(exc)))
        await writer.drain()
        return 1
    write_frame(writer, ("ready",))

    async def pump() -> None:
        while (frame := await read_frame(reader)) is not None:
            if frame[0] == "messages":
                worker.handle(frame[1], frame[2])
            else:
                worker.discovered(frame[1], frame[2])

    pumping = asyncio.create_task(pump())
    try:
        publishing = worker.publishing
        assert worker.pending is not None
        watched = [publishing, pumping, *worker.pending.tasks]
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        failure = next(
            (f.exception() for f in watched if f.done() and f.exception()),
            None,
        )
        if failure is None:
            return 0
        # One line for the session to report; the traceback too if it is not Kafka's.
        if not isinstance(failure, IotgwError):
            log.error("worker_failed", exc_info=failure)
        write_frame(writer, ("error", str(failure) or type(failure).__name__))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return 1
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        await worker.stop()
        writer.close()


def main() -> None:
    fd = int(sys.argv[1])
    # The session process decides when to stop (it closes the socket); a Ctrl-C sent to
    # the whole process group must not kill a worker with messages still in hand.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tune_gc()
    sys.exit(uvloop.run(serve(fd)))


if __name__ == "__main__":
    main()
