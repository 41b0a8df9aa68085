"""A scripted MQTT 5 broker on a raw socket: what the bridge sends, byte by byte.

Written apart from gateway.adapters.mqtt_session on purpose (a shared encoder would hide a shared
mistake); the real-Mosquitto tests check both against a real broker.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def publish(topic: str, payload: bytes, packet_id: int = 0, *, qos: int = 1) -> bytes:
    """A PUBLISH as a broker sends it (no properties)."""
    name = topic.encode()
    body = struct.pack("!H", len(name)) + name
    if qos:
        body += struct.pack("!H", packet_id)
    return packet(0x30 | (qos << 1), body + b"\x00" + payload)


def connack(*, session_present: bool = False, code: int = 0) -> bytes:
    return packet(0x20, bytes([int(session_present), code, 0]))


def suback(
    packet_id: int, code: int = 1, filters: int = 1, codes: list[int] | None = None
) -> bytes:
    answers = bytes(codes) if codes is not None else bytes([code] * filters)
    return packet(0x90, struct.pack("!H", packet_id) + b"\x00" + answers)


def unsuback(packet_id: int, filters: int = 1) -> bytes:
    return packet(0xB0, struct.pack("!H", packet_id) + b"\x00" + bytes(filters))


@dataclass
class Packet:
    kind: int
    flags: int
    body: bytes

    @property
    def packet_id(self) -> int:
        return int(struct.unpack("!H", self.body[:2])[0])

    @property
    def filters(self) -> list[str]:
        """The topic filters of a SUBSCRIBE or UNSUBSCRIBE (no properties)."""
        found, at = [], 3
        while at < len(self.body):
            (size,) = struct.unpack_from("!H", self.body, at)
            found.append(self.body[at + 2 : at + 2 + size].decode())
            at += 2 + size + (1 if self.kind == 8 else 0)
        return found


async def read_packet(reader: asyncio.StreamReader) -> Packet | None:
    """The next packet, or None when the client closed the connection."""
    try:
        first = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        return Packet(first >> 4, first & 0x0F, await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


@dataclass
class Connection:
    """One client connection to the scripted broker and what the client sent on it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    connect: Packet
    subscribe: Packet | None = None
    changes: list[Packet] = field(default_factory=list)  # SUBSCRIBE/UNSUBSCRIBE after the first
    acks: list[int] = field(default_factory=list)  # PUBACK packet ids, as they came
    pings: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def drop(self) -> None:
        """Close the connection abruptly, as a crashing broker would."""
        self.writer.transport.abort()


class ScriptedBroker:
    """Answers CONNECT with `connack_code` and SUBSCRIBE with `suback_code`, records every
    PUBACK and PINGREQ (answering PINGREQ), and lets the test send what it likes."""

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.connack_code = 0
        self.suback_code = 1
        # Filters refused (not authorized) whatever `suback_code` says.
        self.refuse: set[str] = set()
        self.session_present = False
        # Sent right after the CONNACK, ahead of any SUBACK: a kept session's queue.
        self.backlog = b""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._arrived = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> ScriptedBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def connection(self, number: int, timeout_s: float = 10) -> Connection:
        """The `number`th connection (0 the first), once its client has subscribed or
        been answered."""
        async with asyncio.timeout(timeout_s):
            while len(self.connections) <= number:
                self._arrived.clear()
                await self._arrived.wait()
        return self.connections[number]

    def _codes(self, subscribe: Packet) -> list[int]:
        return [0x87 if f in self.refuse else self.suback_code for f in subscribe.filters]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.append(writer)
        connect = await read_packet(reader)
        if connect is None:
            return
        assert connect.kind == 1, connect
        writer.write(connack(session_present=self.session_present, code=self.connack_code))
        writer.write(self.backlog)
        connection = Connection(reader, writer, connect)
        if self.connack_code == 0 and not self.session_present:
            subscribe = await read_packet(reader)
            if subscribe is None:
                return
            assert subscribe.kind == 8, subscribe
            connection.subscribe = subscribe
            writer.write(suback(subscribe.packet_id, codes=self._codes(subscribe)))
        self.connections.append(connection)
        self._arrived.set()
        while (received := await read_packet(reader)) is not None:
            if received.kind == 4:
                connection.acks.append(received.packet_id)
            elif received.kind == 12:
                connection.pings += 1
                writer.write(b"\xd0\x00")
            elif received.kind == 8 and connection.subscribe is None:
                connection.subscribe = received
                writer.write(suback(received.packet_id, codes=self._codes(received)))
            elif received.kind == 8:
                connection.changes.append(received)
                writer.write(suback(received.packet_id, codes=self._codes(received)))
            elif received.kind == 10:
                connection.changes.append(received)
                writer.write(unsuback(received.packet_id, len(received.filters)))
            elif received.kind == 14:
                break
        connection.closed.set()
