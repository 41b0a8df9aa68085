"""The bridge's MQTT 5 session: one persistent session and its subscriptions, acknowledged
in arrival order, with the gateway's own flow control.

Why not gmqtt here (the devices' simulator and the rules engine keep it): gmqtt sends a
PUBACK when a message's handler returns, so acknowledgements leave in the order Kafka
finishes, not the order messages arrived (MQTT-4.6.0-2), and it reads and dispatches all
the socket holds, so nothing but the broker bounds what is in flight. Mosquitto 2.0.11
bounds nothing (its in-flight quota is recomputed wrongly on each PUBACK, upstream #2306),
and with out-of-order PUBACKs it lets a device's new reading overtake its queued ones.
This module speaks the small part of MQTT 5 a subscriber needs (CONNECT, SUBSCRIBE,
UNSUBSCRIBE, PUBLISH in at QoS 0/1, PUBACK, PINGREQ, DISCONNECT) and owns those two rules:

- every received PUBLISH gets an index; `complete(indices)` marks them finished, and the
  PUBACKs of the finished run at the front leave together, in arrival order;
- at `max_in_flight` unacknowledged messages it stops parsing and reading the socket
  (TCP back-pressure) and resumes below it, so memory is bounded whatever the broker sends.

A connection's unacknowledged messages are never acknowledged on a later connection
(packet ids are reused); the broker sends them again. They still count as in flight until
completed, so reconnects cannot multiply what the gateway holds.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway.adapters.mqtt import tls_context, unreachable
from gateway.domain.backoff import Backoff
from gateway.errors import IotgwError
from gateway.settings import MqttEndpoint
from schemas.reading import MAX_PAYLOAD_BYTES

__all__ = ["Message", "MqttSession", "SessionOptions", "encode_connect", "encode_subscribe"]

log = structlog.get_logger(__name__)

# Packet types (MQTT 5, section 2.1.2).
_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK = 8, 9, 10, 11
_PINGREQ, _PINGRESP, _DISCONNECT = 12, 13, 14
# Properties this client sends or reads (section 2.2.2.2).
_SESSION_EXPIRY, _RECEIVE_MAXIMUM, _SERVER_KEEP_ALIVE, _REASON_STRING = 0x11, 0x21, 0x13, 0x1F
# Subscription options: QoS 1, and retained messages not sent at subscribe time
# (Retain Handling 2): a re-subscribe must not deliver old readings again.
_SUBSCRIPTION_OPTIONS = 0x01 | 0x20
_SUBSCRIBE_PACKET_ID = 1
# Subscriptions changed while running (learned state topics) use ids from here on.
_FIRST_CHANGE_ID = 2
_PUBACK_PACKET = struct.Struct("!BBH")
_PINGREQ_PACKET = b"\xc0\x00"
_DISCONNECT_PACKET = b"\xe0\x00"  # normal disconnection: the session is kept
# Of a PUBLISH whose payload is larger than this, or whose properties are, the session
# keeps the first bytes of the payload and discards the rest as it arrives (a too_large
# dead letter keeps 64 KiB): what one message holds is bounded, whatever the broker sends.
KEPT_PAYLOAD_BYTES = MAX_PAYLOAD_BYTES
_MAX_PROPERTIES_BYTES = 64 * 1024
# Reconnect at once, then back off to this; a bridge away is a backlog growing.
_RECONNECT = Backoff(first=0.2, cap=5.0)

# The byte width of each property's value, by identifier; -1 a UTF-8 string or binary
# data (two-byte length), -2 a string pair, 0 a variable byte integer (section 2.2.2.2).
_PROPERTY_WIDTH = {
    0x01: 1, 0x02: 4, 0x03: -1, 0x08: -1, 0x09: -1, 0x0B: 0, 0x11: 4, 0x12: -1,
    0x13: 2, 0x15: -1, 0x16: -1, 0x17: 1, 0x19: 1, 0x1A: -1, 0x1C: -1, 0x1F: -1,
    0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x26: -2, 0x27: 4, 0x28: 1,
    0x29: 1, 0x2A: 1,
}  # fmt: skip

# CONNACK and SUBACK reason codes a user may meet (section 3.2.2.2, 3.9.3).
_REASONS = {
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned",
    0x8C: "bad authentication method", 0x8F: "topic filter invalid",
    0x91: "packet identifier in use", 0x97: "quota exceeded",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded", 0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}  # fmt: skip
# Refusals that retrying with the same settings cannot fix.
_PERMANENT = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x8F, 0x9E, 0xA2}


class ProtocolError(Exception):
    """The broker sent something MQTT 5 does not allow; the connection is dropped."""


class RefusedError(IotgwError):
    """The broker refused the connection or the subscription."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Message:
    """One received PUBLISH: its index in arrival order, topic and payload, and the
    payload's size (larger than `payload` when only its first bytes were kept)."""

    index: int
    topic: str
    payload: bytes
    size: int


@dataclass(frozen=True)
class SessionOptions:
    """How the session connects and what it subscribes to."""

    endpoint: MqttEndpoint
    client_id: str
    subscriptions: tuple[str, ...]
    session_expiry_s: int
    max_in_flight: int
    ca_file: Path | None = None
    keepalive_s: int = 30
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_in_flight <= 65535:
            raise ValueError("max_in_flight must be from 1 to 65535 (the MQTT receive maximum)")
        if not self.subscriptions:
            raise ValueError("a session needs at least one subscription")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def encode_connect(options: SessionOptions) -> bytes:
    """CONNECT: clean start off (resume the persistent session), its expiry, our receive
    maximum, and the login when the URL has one."""
    endpoint = options.endpoint
    flags = 0
    payload = _string(options.client_id)
    if endpoint.username is not None:
        flags |= 0x80
        payload += _string(endpoint.username)
    if endpoint.password is not None:
        flags |= 0x40
        payload += _string(endpoint.password.get_secret_value())
    properties = struct.pack(
        "!BIBH", _SESSION_EXPIRY, options.session_expiry_s, _RECEIVE_MAXIMUM, options.max_in_flight
    )
    header = _string("MQTT") + bytes([5, flags]) + struct.pack("!H", options.keepalive_s)
    return _packet(_CONNECT << 4, header + _varint(len(properties)) + properties + payload)


def encode_subscribe(
    subscriptions: tuple[str, ...] | list[str], packet_id: int = _SUBSCRIBE_PACKET_ID
) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00"  # no properties
    for subscription in subscriptions:
        body += _string(subscription) + bytes([_SUBSCRIPTION_OPTIONS])
    return _packet((_SUBSCRIBE << 4) | 0x02, body)


def encode_unsubscribe(subscriptions: tuple[str, ...] | list[str], packet_id: int) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00"  # no properties
    for subscription in subscriptions:
        body += _string(subscription)
    return _packet((_UNSUBSCRIBE << 4) | 0x02, body)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ProtocolError("truncated variable byte integer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise ProtocolError("variable byte integer longer than 4 bytes")


def _properties(data: bytes, pos: int) -> tuple[dict[int, int | bytes], int]:
    """The properties at `pos` (integers and strings; pairs skipped) and where they end."""
    length, pos = _read_varint(data, pos)
    end = pos + length
    if end > len(data):
        raise ProtocolError("properties longer than the packet")
    found: dict[int, int | bytes] = {}
    while pos < end:
        identifier = data[pos]
        width = _PROPERTY_WIDTH.get(identifier)
        if width is None:
            raise ProtocolError(f"unknown property 0x{identifier:02x}")
        pos += 1
        if width > 0:
            found[identifier] = int.from_bytes(data[pos : pos + width], "big")
            pos += width
        elif width == 0:
            found[identifier], pos = _read_varint(data, pos)
        else:
            for part in range(-width):
                size = int.from_bytes(data[pos : pos + 2], "big")
                if part == 0 and width == -1:
                    found[identifier] = bytes(data[pos + 2 : pos + 2 + size])
                pos += 2 + size
    if pos != end:
        raise ProtocolError("properties overrun their length")
    return found, end


def _reason(code: int, properties: dict[int, int | bytes]) -> str:
    text = _REASONS.get(code, f"reason code 0x{code:02x}")
    said = properties.get(_REASON_STRING)
    if isinstance(said, bytes) and said:
        text += f" ({said.decode(errors='replace')[:200]})"
    return text


class _Protocol(asyncio.Protocol):
    def __init__(self, session: MqttSession) -> None:
        self._session = session

    def data_received(self, data: bytes) -> None:
        self._session._data_received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._session._connection_lost(self, exc)


class MqttSession:
    """One persistent MQTT 5 session that hands received messages to `on_messages`.

    `on_messages(messages)` is called synchronously with each parsed run of messages, in
    arrival order; `complete(indices)` is how its owner says they are done (in any order).
    `connect()` makes the first connection and subscription (IotgwError if the broker
    refuses or is away); `run()` then reconnects whenever it is lost, until `close()`.
    """

    def __init__(
        self,
        options: SessionOptions,
        on_messages: Callable[[list[Message]], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self._on_messages = on_messages
        self._clock = clock
        self._shared = any(f.startswith("$share/") for f in options.subscriptions)
        # The filters the session holds now: the options' and those added at run time.
        # The filters the session holds now, in order (a dict as an ordered set): the
        # options' (refused: the session ends) and those added at run time (refused: dropped).
        self._filters: dict[str, None] = dict.fromkeys(options.subscriptions)
        self._base = frozenset(options.subscriptions)
        self._refused_filters: set[str] = set()
        # Changed while disconnected: the next connection subscribes to all of them again.
        self._changed_offline = False
        self._removed_offline: set[str] = set()
        # SUBSCRIBE/UNSUBSCRIBE sent at run time and not answered yet, by packet id.
        self._changes: dict[int, tuple[str, tuple[str, ...]]] = {}
        self._suback_filters: tuple[str, ...] = ()
        self._change_id = _FIRST_CHANGE_ID
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        # The CONNACK awaited (session present, keep-alive), and the SUBACK.
        self._connack: asyncio.Future[tuple[bool, int]] | None = None
        self._suback: asyncio.Future[None] | None = None
        # A refusal seen after connect() returned; run() raises it.
        self._refused: RefusedError | None = None
        self._buffer = b""
        # Bytes still to come of an oversized PUBLISH whose start was handed over.
        self._discard = 0
        # Parsing stopped at the in-flight limit (or for shutdown); the socket not read.
        self._paused = False
        self._reading_paused = False
        self._keepalive_s = options.keepalive_s
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._last_in = self._last_out = 0.0
        self._lost = asyncio.Event()
        self._closing = False
        # This connection's messages in arrival order, in a ring of max_in_flight slots:
        # indices [head, next) are unacknowledged, index i lives in slot i % capacity.
        self._capacity = capacity = options.max_in_flight
        self._packet_ids = [0] * capacity
        self._finished = bytearray(capacity)
        self._received = [0.0] * capacity
        self._head = self._next = 0
        # Messages of earlier connections not completed yet: the gateway still holds them.
        self._orphans = 0
        self.connected = False
        self.subscribed = False
        self.connections = 0
        # Called with each acknowledged message's seconds from arrival to acknowledgement,
        # and with the number of messages a lost connection left unacknowledged.
        self.on_acknowledged: Callable[[float], None] | None = None
        self.on_unacknowledged: Callable[[int], None] | None = None
        self._drained: asyncio.Future[None] | None = None

    # -- what the owner uses ---------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Messages received and not acknowledged, of this connection and earlier ones."""
        return self._next - self._head + self._orphans

    def complete(self, indices: list[int]) -> None:
        """Messages `indices` are safe in Kafka: acknowledge the finished run at the front."""
        head, capacity, finished = self._head, self._capacity, self._finished
        for index in indices:
            if index >= head:
                finished[index % capacity] = 1
            else:
                # Of a lost connection: acknowledged ones never complete again.
                self._orphans -= 1
        if head < self._next and finished[head % capacity]:
            ids, received, observe = self._packet_ids, self._received, self.on_acknowledged
            now = self._clock()
            acks = []
            while head < self._next and finished[head % capacity]:
                slot = head % capacity
                finished[slot] = 0
                if ids[slot]:
                    acks.append(_PUBACK_PACKET.pack(_PUBACK << 4, 2, ids[slot]))
                if observe is not None:
                    observe(now - received[slot])
                head += 1
            self._head = head
            if acks:
                self._write(b"".join(acks))
        if self._paused and not self._closing:
            self._maybe_resume()
        if self._drained is not None and not self.in_flight and not self._drained.done():
            self._drained.set_result(None)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return tuple(self._filters)

    def subscribe(self, filters: tuple[str, ...] | list[str]) -> None:
        """Add filters to the session (now if connected, else on the next connection). A
        filter the broker refuses is logged and dropped, not asked for again."""
        new = [f for f in filters if f not in self._filters and f not in self._refused_filters]
        if not new:
            return
        self._filters.update(dict.fromkeys(new))
        self._change("subscribe", tuple(new))

    def unsubscribe(self, filters: tuple[str, ...] | list[str], *, known: bool = True) -> None:
        """Remove filters from the session: the broker stops sending their messages. With
        `known=False` also filters this process never subscribed to (a kept session may
        hold an earlier run's)."""
        gone = [f for f in filters if f in self._filters or not known]
        if not gone:
            return
        for f in gone:
            self._filters.pop(f, None)
        self._change("unsubscribe", tuple(gone))

    def _change(self, kind: str, filters: tuple[str, ...]) -> None:
        if not self.connected or self._transport is None:
            self._changed_offline = True
            if kind == "unsubscribe":
                self._removed_offline.update(filters)
            else:
                self._removed_offline.difference_update(filters)
            return
        packet_id = self._change_id
        self._change_id = packet_id + 1 if packet_id < 0xFFFF else _FIRST_CHANGE_ID
        self._changes[packet_id] = (kind, filters)
        encode = encode_subscribe if kind == "subscribe" else encode_unsubscribe
        self._write(encode(filters, packet_id))

    async def drained(self) -> None:
        """Return once no message is in flight (the owner completed them all)."""
        while self.in_flight:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    async def connect(self) -> None:
        """The first connection and subscription; IotgwError with the reason if refused."""
        self._loop = asyncio.get_running_loop()
        await self._connect_once(first=True)

    async def run(self) -> None:
        """Reconnect whenever the connection is lost, until `close()`. A refusal retrying
        cannot fix (a revoked login, a forbidden subscription) ends it with RefusedError."""
        failures = 0
        while True:
            await self._lost.wait()
            if self._closing:
                return
            if self._refused is not None:
                raise self._refused
            try:
                await self._connect_once(first=False)
                failures = 0
            except IotgwError as exc:
                if isinstance(exc, RefusedError) and exc.permanent:
                    raise
                delay = _RECONNECT.delay(failures)
                failures += 1
                log.warning("mqtt_reconnect_failed", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)

    def stop_reading(self) -> None:
        """Take no more messages (shutdown): the broker keeps them for the next session."""
        self._closing = True
        self._paused = True
        self._set_reading(False)

    def close(self) -> None:
        """DISCONNECT (the broker keeps the session) and close; PUBACKs due went out before."""
        self.stop_reading()
        transport = self._transport
        self._detach(None)
        if transport is not None and not transport.is_closing():
            transport.write(_DISCONNECT_PACKET)
            transport.close()
        self._lost.set()

    # -- connecting ------------------------------------------------------------------------

    async def _connect_once(self, *, first: bool) -> None:
        options = self.options
        endpoint = options.endpoint
        where = endpoint.address
        context = tls_context(endpoint, options.ca_file)
        loop = self._loop
        assert loop is not None
        self._lost.clear()
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self),
                    endpoint.host,
                    endpoint.port,
                    ssl=context or None,
                    server_hostname=endpoint.host if context else None,
                ),
                options.timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            self._lost.set()
            raise unreachable(endpoint, exc) from None
        if self._closing:
            transport.close()
            self._lost.set()
            return
        self._transport, self._protocol = transport, protocol
        self._buffer = b""
        self._discard = 0
        self._paused = self._reading_paused = False
        self._last_in = self._last_out = self._clock()
        try:
            self._connack = loop.create_future()
            self._write(encode_connect(options))
            session_present, keepalive = await self._answer(self._connack, "CONNACK", where)
            self._keepalive_s = keepalive
            self.connected = True
            self.connections += 1
            self._start_keepalive()
            log.info("mqtt_connected", session_present=session_present, connection=self.connections)
            # A plain subscription lives in the session the broker kept; a shared one does
            # not survive a Mosquitto crash (2.0.x never persists them), and a new session
            # has none. The first connection subscribes in any case (the filter may have
            # changed since the session was made). Readings queued in a kept session come
            # right after the CONNACK, ahead of the SUBACK, and may fill the in-flight
            # limit: the SUBACK is then awaited only when the broker kept no session.
            self.subscribed = session_present and not self._shared
            self._changes.clear()
            if first or not session_present or self._shared or self._changed_offline:
                self._changed_offline = False
                self._suback = loop.create_future()
                self._suback.add_done_callback(self._subscribed)
                # The options' filters in the SUBSCRIBE whose refusal ends the session; those
                # added at run time apart, so that one refused cannot stop the bridge.
                self._suback_filters = tuple(f for f in self._filters if f in self._base)
                self._write(encode_subscribe(self._suback_filters))
                added = tuple(f for f in self._filters if f not in self._base)
                if added:
                    self._change("subscribe", added)
                if self._removed_offline:
                    removed, self._removed_offline = tuple(self._removed_offline), set()
                    self._change("unsubscribe", removed)
                if not session_present:
                    await self._answer(self._suback, "SUBACK", where)
        except BaseException:
            self._detach(None)
            transport.close()
            self._lost.set()
            raise
        # Messages that came with the CONNACK or SUBACK wait in the buffer until now.
        self._parse()

    def _subscribed(self, suback: asyncio.Future[None]) -> None:
        if suback.cancelled() or suback is not self._suback:
            return
        refusal = suback.exception()
        if refusal is None:
            self.subscribed = True
        elif isinstance(refusal, RefusedError):
            # Whether connect() is waiting for it or not, a refused subscription is the
            # end: run() raises it (retrying cannot fix an ACL or a QoS 0 grant).
            where = self.options.endpoint.address
            self._refused = RefusedError(f"the MQTT broker at {where} {refusal}", permanent=True)
            transport = self._transport
            self._detach(None)
            if transport is not None:
                transport.close()
            self._lost.set()

    async def _answer(self, future: asyncio.Future[Any], what: str, where: str) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.options.timeout_s)
        except TimeoutError:
            raise IotgwError(f"the MQTT broker at {where} sent no {what}") from None
        except RefusedError as exc:
            message = f"the MQTT broker at {where} {exc}"
            raise RefusedError(message, permanent=exc.permanent) from None
        except ConnectionError as exc:
            raise IotgwError(f"the MQTT broker at {where} closed the connection: {exc}") from None

    # -- the connection ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            self._last_out = self._clock()

    def _data_received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        self._last_in = self._clock()
        if self._discard:
            # The rest of an oversized PUBLISH whose start was handed over already.
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            data = data[dropped:]
            if not data:
                return
        self._buffer = self._buffer + data if self._buffer else data
        self._parse()

    def _parse(self) -> None:
        """Handle every whole packet buffered; stop before a PUBLISH at the in-flight limit."""
        if self._paused:
            return
        data = self._buffer
        size = len(data)
        pos = 0
        capacity = self._capacity
        messages: list[Message] = []
        try:
            while pos < size:
                first = data[pos]
                kind = first >> 4
                if kind == _PUBLISH and self._next - self._head + self._orphans >= capacity:
                    self._paused = True
                    self._set_reading(False)
                    break
                # The remaining length: a variable byte integer after the first byte.
                length, shift, at, whole = 0, 0, pos + 1, False
                while at < size:
                    byte = data[at]
                    at += 1
                    length |= (byte & 0x7F) << shift
                    if byte < 0x80:
                        whole = True
                        break
                    shift += 7
                    if shift > 21:
                        raise ProtocolError("remaining length longer than 4 bytes")
                if not whole:
                    break
                end = at + length
                if kind != _PUBLISH:
                    if end > size:
                        break
                    self._control(kind, data[at:end])
                    pos = end
                    continue
                message = self._publish(first, data, at, end)
                if message is None:
                    break  # not enough of it yet
                messages.append(message)
                if end > size:
                    # An oversized PUBLISH: its start is kept, the rest is dropped as it comes.
                    self._discard = end - size
                    pos = size
                    break
                pos = end
        except (ProtocolError, UnicodeDecodeError) as exc:
            log.warning("mqtt_protocol_error", error=str(exc))
            transport = self._transport
            self._detach(exc)
            if transport is not None:
                transport.close()
            self._lost.set()
            return
        finally:
            if messages:
                self._on_messages(messages)
        self._buffer = data[pos:] if pos else data

    def _publish(self, first: int, data: bytes, at: int, end: int) -> Message | None:
        """The PUBLISH whose variable header starts at `at` and which ends at `end` (perhaps
        beyond what is buffered), or None until enough of it is here.

        Every field is read within the packet's own length. A PUBLISH whose payload or
        properties are larger than what is kept is handed over once its header and the
        first KEPT_PAYLOAD_BYTES of its payload are here, with its true payload size; the
        caller drops the rest as it arrives.
        """
        size = len(data)
        qos = (first >> 1) & 0x03
        if qos == 2:
            raise ProtocolError("a QoS 2 PUBLISH on a QoS 1 subscription")
        here = min(size, end)  # what of this packet is buffered
        if end < at + 2:
            raise ProtocolError("a PUBLISH shorter than its topic's length")
        if here < at + 2:
            return None
        topic_end = at + 2 + ((data[at] << 8) | data[at + 1])
        header_end = topic_end + (2 if qos else 0)
        if header_end >= end:
            raise ProtocolError("a PUBLISH shorter than its topic and packet id")
        # The properties' length: a variable byte integer, wholly within the packet.
        properties, shift, cursor = 0, 0, header_end
        while True:
            if cursor >= here:
                if here == end:
                    raise ProtocolError("a PUBLISH whose properties' length is cut off")
                return None
            byte = data[cursor]
            cursor += 1
            properties |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("a properties' length longer than 4 bytes")
        body = cursor + properties
        if body > end:
            raise ProtocolError("PUBLISH properties longer than the packet")
        payload_size = end - body
        if end > size:
            oversized = payload_size > KEPT_PAYLOAD_BYTES or properties > _MAX_PROPERTIES_BYTES
            if not oversized:
                return None
            if properties <= _MAX_PROPERTIES_BYTES and size < body + KEPT_PAYLOAD_BYTES:
                return None
            payload = data[body : body + KEPT_PAYLOAD_BYTES] if body < size else b""
        else:
            payload = data[body : min(end, body + KEPT_PAYLOAD_BYTES)]
        topic = data[at + 2 : topic_end].decode()
        if not topic:
            raise ProtocolError("a PUBLISH with a topic alias, which we did not allow")
        packet_id = 0
        if qos:
            packet_id = (data[topic_end] << 8) | data[topic_end + 1]
            if not packet_id:
                raise ProtocolError("a QoS 1 PUBLISH with packet id 0")
        index = self._next
        slot = index % self._capacity
        self._packet_ids[slot] = packet_id
        self._received[slot] = self._last_in
        self._next = index + 1
        return Message(index, topic, payload, payload_size)

    def _control(self, kind: int, body: bytes) -> None:
        if kind == _CONNACK:
            connack = self._connack
            if len(body) < 2:
                raise ProtocolError("a short CONNACK")
            if connack is None or connack.done():
                raise ProtocolError("a CONNACK nobody asked for")
            code = body[1]
            properties = _properties(body, 2)[0] if len(body) > 2 else {}
            if code:
                refusal = f"refused the connection: {_reason(code, properties)}"
                connack.set_exception(RefusedError(refusal, permanent=code in _PERMANENT))
            else:
                keepalive = properties.get(_SERVER_KEEP_ALIVE, self.options.keepalive_s)
                assert isinstance(keepalive, int)
                connack.set_result((bool(body[0] & 0x01), keepalive))
        elif kind in (_SUBACK, _UNSUBACK):
            if len(body) < 3:
                raise ProtocolError(f"a short {'SUBACK' if kind == _SUBACK else 'UNSUBACK'}")
            packet_id = struct.unpack_from("!H", body)[0]
            properties, at = _properties(body, 2)
            change = self._changes.pop(packet_id, None)
            if change is not None:
                self._changed(change, body[at:], properties)
                return
            suback = self._suback
            if kind != _SUBACK or suback is None or suback.done():
                raise ProtocolError("a SUBACK nobody asked for")
            problem = self._refusal(self._suback_filters, body[at:], properties)
            if problem:
                suback.set_exception(RefusedError(problem, permanent=True))
            else:
                suback.set_result(None)
        elif kind == _DISCONNECT:
            code = body[0] if body else 0
            properties = _properties(body, 1)[0] if len(body) > 1 else {}
            reason = _reason(code, properties) if code else "normal disconnection"
            log.warning("mqtt_disconnected_by_broker", reason=reason)
            connack = self._connack
            if connack is not None and not connack.done():
                connack.set_exception(
                    RefusedError(f"disconnected: {reason}", permanent=code in _PERMANENT)
                )
        elif kind != _PINGRESP:
            raise ProtocolError(f"unexpected packet type {kind} for a subscriber")

    @staticmethod
    def _refusal(
        filters: tuple[str, ...], codes: bytes, properties: dict[int, int | bytes]
    ) -> str | None:
        """Why a SUBACK's answer for `filters` is not QoS 1 for each, if it is not."""
        for number, subscription in enumerate(filters):
            code = codes[number] if number < len(codes) else 0x80
            if code >= 0x80:
                return f"refused {subscription}: {_reason(code, properties)}"
            if code == 0:
                return (
                    f"granted {subscription} at QoS 0 only: readings would "
                    "not be kept while the bridge is away"
                )
        return None

    def _changed(
        self,
        change: tuple[str, tuple[str, ...]],
        codes: bytes,
        properties: dict[int, int | bytes],
    ) -> None:
        """The answer to a subscription changed at run time: a refusal is logged, not fatal
        (the filters of the options were granted; this one may be forbidden by an ACL)."""
        kind, filters = change
        if kind != "subscribe":
            return
        refused = [
            f for n, f in enumerate(filters) if (codes[n] if n < len(codes) else 0x80) >= 0x80
        ]
        for f in refused:
            self._filters.pop(f, None)
            self._refused_filters.add(f)
        if refused:
            problem = self._refusal(filters, codes, properties)
            log.error("mqtt_subscribe_refused", filters=",".join(refused), reason=problem)
        else:
            log.info("mqtt_subscribed", filters=",".join(filters))

    def _connection_lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        was_connected = self.connected
        unacknowledged = self._detach(exc)
        if was_connected and not self._closing:
            log.warning(
                "mqtt_disconnected",
                error=str(exc) if exc else "closed by the broker",
                unacknowledged=unacknowledged,
            )
        self._lost.set()

    def _detach(self, exc: Exception | None) -> int:
        """Forget the current connection; its unacknowledged messages become orphans (the
        broker sends them again). Returns how many there were."""
        self._protocol = None
        self._transport = None
        self._stop_keepalive()
        self.connected = self.subscribed = False
        # Subscription changes the broker did not confirm are made again on the next
        # connection, even if it keeps the session.
        if (self._suback is not None and not self._suback.done()) or self._changes:
            self._changed_offline = True
            for kind, filters in self._changes.values():
                if kind == "unsubscribe":
                    self._removed_offline.update(f for f in filters if f not in self._filters)
            self._changes.clear()
        for future in (self._connack, self._suback):
            if future is not None and not future.done():
                future.set_exception(ConnectionError(str(exc) if exc else "closed"))
                future.exception()  # retrieved: nobody may be waiting any more
        self._connack = self._suback = None
        head, end, capacity, finished = self._head, self._next, self._capacity, self._finished
        unfinished = 0
        for index in range(head, end):
            unfinished += not finished[index % capacity]
            finished[index % capacity] = 0
        self._orphans += unfinished
        if end > head and self.on_unacknowledged is not None:
            self.on_unacknowledged(end - head)
        self._head = end
        self._buffer = b""
        self._discard = 0
        self._paused = self._closing
        self._reading_paused = False
        return end - head

    def _maybe_resume(self) -> None:
        # Resume a quarter below the limit, so the socket is not toggled for each message.
        if self.in_flight >= self._capacity - self._capacity // 4:
            return
        self._paused = False
        assert self._loop is not None
        self._loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self._paused or self._transport is None:
            return
        # Silence while paused was ours; keep-alive counts from now.
        self._last_in = self._clock()
        self._parse()
        if not self._paused:
            self._set_reading(True)

    def _set_reading(self, on: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing() or on != self._reading_paused:
            return
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()
        self._reading_paused = not on

    # -- keep-alive ------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        self._stop_keepalive()
        if self._keepalive_s and self._loop is not None:
            self._keepalive_timer = self._loop.call_later(self._keepalive_s / 2, self._tick)

    def _stop_keepalive(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None

    def _tick(self) -> None:
        now = self._clock()
        # While paused the socket is not read, so the broker's PINGRESPs wait unread and
        # silence means nothing; the PINGREQs still go out and keep the session alive.
        if not self._reading_paused and now - self._last_in > 2 * self._keepalive_s:
            log.warning("mqtt_keepalive_lost", silent_s=round(now - self._last_in))
            if self._transport is not None:
                self._transport.close()
            return
        if now - self._last_out >= self._keepalive_s / 2:
            self._write(_PINGREQ_PACKET)
        self._start_keepalive()
