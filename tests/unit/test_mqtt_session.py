"""The bridge's MQTT 5 session against a scripted broker on a raw socket: acknowledgement
order, the gateway's own flow control, keep-alive while paused, reconnects and refusals."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest

from gateway.adapters.mqtt_session import KEPT_PAYLOAD_BYTES, Message, MqttSession, SessionOptions
from gateway.errors import IotgwError
from gateway.settings import parse_mqtt_url
from tests.raw_mqtt import Connection, ScriptedBroker, publish
from tests.support import until

pytestmark = pytest.mark.unit

TOPIC = "devices/d1/telemetry"


@dataclass
class Owner:
    """What the bridge would be: takes messages, checks the in-flight bound on each."""

    session: MqttSession | None = None
    messages: list[Message] = field(default_factory=list)
    peak: int = 0

    def take(self, messages: list[Message]) -> None:
        assert self.session is not None
        self.peak = max(self.peak, self.session.in_flight)
        self.messages.extend(messages)


def options(port: int, **overrides: object) -> SessionOptions:
    values: dict[str, object] = {
        "endpoint": parse_mqtt_url(f"mqtt://user:secret@127.0.0.1:{port}"),
        "client_id": "bridge-under-test",
        "subscriptions": ("devices/+/telemetry",),
        "session_expiry_s": 300,
        "max_in_flight": 100,
        "timeout_s": 5.0,
        **overrides,
    }
    return SessionOptions(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def session_with(
    broker: ScriptedBroker, **overrides: object
) -> AsyncIterator[tuple[MqttSession, Owner]]:
    owner = Owner()
    session = MqttSession(options(broker.port, **overrides), owner.take)
    owner.session = session
    await session.connect()
    running = asyncio.create_task(session.run())
    try:
        yield session, owner
    finally:
        session.close()
        await running


async def complete_as_they_come(session: MqttSession, owner: Owner, count: int) -> None:
    """Complete messages as the session hands them over, until `count` came."""
    done = 0
    while done < count:
        await until(partial(more_than, owner, done), 10, f"more than {done} messages")
        fresh, done = owner.messages[done:], len(owner.messages)
        session.complete([m.index for m in fresh])


def more_than(owner: Owner, count: int) -> bool:
    return len(owner.messages) > count


def send_all(connection: Connection, count: int, first_id: int = 1, size: int = 20) -> None:
    connection.send(b"".join(publish(TOPIC, b"x" * size, first_id + i) for i in range(count)))


async def test_connect_sends_a_persistent_session_with_login_and_receive_maximum() -> None:
    """CONNECT: MQTT 5, clean start off, the login, session expiry and receive maximum;
    SUBSCRIBE: the filter at QoS 1 with retained messages not resent."""
    async with ScriptedBroker() as broker, session_with(broker, max_in_flight=321):
        connection = await broker.connection(0)
    body = connection.connect.body
    assert body[:7] == b"\x00\x04MQTT\x05"
    flags = body[7]
    assert flags & 0x02 == 0  # clean start off: resume the session
    assert flags & 0xC0 == 0xC0  # user name and password
    assert b"\x11\x00\x00\x01\x2c" in body  # session expiry 300 s
    assert b"\x21\x01\x41" in body  # receive maximum 321
    assert body.endswith(b"\x00\x04user\x00\x06secret")
    assert connection.subscribe is not None
    assert connection.subscribe.body.endswith(b"\x00\x13devices/+/telemetry\x21")


async def test_pubacks_leave_in_arrival_order_whatever_order_messages_finish() -> None:
    """Messages finished last-first are acknowledged only when the first is, then all at
    once, in arrival order; QoS 0 messages take their place but get no PUBACK."""
    async with ScriptedBroker() as broker, session_with(broker) as (session, owner):
        connection = await broker.connection(0)
        ids = [7, 3, 901, 12, 5]
        connection.send(b"".join(publish(TOPIC, b"{}", i) for i in ids[:2]))
        connection.send(publish(TOPIC, b"{}", qos=0))
        connection.send(b"".join(publish(TOPIC, b"{}", i) for i in ids[2:]))
        await until(lambda: len(owner.messages) == 6, 5, "six messages")
        indices = [m.index for m in owner.messages]
        session.complete(indices[:0:-1])  # all but the first, last first
        assert session.in_flight == 6
        session.complete([indices[0]])
        await until(lambda: len(connection.acks) == 5, 5, "five PUBACKs")
        assert connection.acks == ids
        assert session.in_flight == 0


async def test_a_finished_run_is_acknowledged_up_to_the_first_unfinished() -> None:
    """Finishing 0 and 2 acknowledges 0 only; finishing 1 then acknowledges 1 and 2."""
    async with ScriptedBroker() as broker, session_with(broker) as (session, owner):
        connection = await broker.connection(0)
        send_all(connection, 3, first_id=40)
        await until(lambda: len(owner.messages) == 3, 5, "three messages")
        first, second, third = (m.index for m in owner.messages)
        session.complete([first, third])
        await until(lambda: connection.acks == [40], 5, "the first PUBACK")
        session.complete([second])
        await until(lambda: connection.acks == [40, 41, 42], 5, "all PUBACKs")


async def test_in_flight_never_exceeds_the_limit_and_the_socket_is_not_read() -> None:
    """A broker that ignores the receive maximum sends 200 messages of 60 KiB at once: the
    session takes 10, leaves the rest in the socket (the broker's writes back up), and
    takes more only as messages are acknowledged."""
    async with (
        ScriptedBroker() as broker,
        session_with(broker, max_in_flight=10) as (
            session,
            owner,
        ),
    ):
        connection = await broker.connection(0)
        send_all(connection, 200, size=60 * 1024)
        await until(lambda: len(owner.messages) == 10, 5, "ten messages")
        transport = connection.writer.transport
        # Kernel buffers hold a few MB; the rest waits in the broker: back-pressure.
        await until(lambda: transport.get_write_buffer_size() > 4_000_000, 10, "backed up")
        assert len(owner.messages) == 10
        await complete_as_they_come(session, owner, 200)
        await until(lambda: len(connection.acks) == 200, 10, "every PUBACK")
    assert owner.peak <= 10
    assert connection.acks == list(range(1, 201))


async def test_keepalive_goes_on_while_paused_at_the_limit() -> None:
    """Paused at the limit for several keep-alive periods, the session still pings the
    broker and keeps its connection; acknowledged, it takes the rest."""
    async with (
        ScriptedBroker() as broker,
        session_with(broker, max_in_flight=2, keepalive_s=1) as (session, owner),
    ):
        connection = await broker.connection(0)
        send_all(connection, 5)
        await until(lambda: len(owner.messages) == 2, 5, "two messages")
        await until(lambda: connection.pings >= 3, 10, "three PINGREQs while paused")
        assert session.connected
        assert not connection.closed.is_set()
        session.complete([m.index for m in owner.messages])
        await until(lambda: len(owner.messages) == 4, 5, "two more messages")


async def test_a_lost_connections_messages_are_never_acknowledged_on_the_next() -> None:
    """Messages unfinished when the connection drops are not acknowledged on the next
    connection (its packet ids mean other messages), but count as in flight until done."""
    async with (
        ScriptedBroker() as broker,
        session_with(broker, max_in_flight=8) as (
            session,
            owner,
        ),
    ):
        first = await broker.connection(0)
        send_all(first, 5)
        await until(lambda: len(owner.messages) == 5, 5, "five messages")
        broker.session_present = True
        first.drop()
        second = await broker.connection(1)
        assert second.subscribe is None  # the plain subscription lives in the session
        await until(lambda: session.connected, 5, "reconnected")
        send_all(second, 5)  # the broker sends them again, with the same ids
        await until(lambda: len(owner.messages) == 8, 5, "three more (5 held + 3 = 8)")
        old = [m.index for m in owner.messages[:5]]
        session.complete(old)
        await until(lambda: len(owner.messages) == 10, 5, "the last two")
        session.complete([m.index for m in owner.messages[5:]])
        await until(lambda: len(second.acks) == 5, 5, "five PUBACKs")
    assert first.acks == []
    assert second.acks == [1, 2, 3, 4, 5]
    assert owner.peak <= 8


async def test_a_shared_subscription_is_made_again_on_every_connection() -> None:
    """Mosquitto forgets shared subscriptions on a crash while keeping the session."""
    async with (
        ScriptedBroker() as broker,
        session_with(broker, subscriptions=("$share/g/devices/+/telemetry",)) as (session, _),
    ):
        first = await broker.connection(0)
        broker.session_present = True
        first.drop()
        second = await broker.connection(1)
        await until(lambda: second.subscribe is not None, 5, "subscribed again")
        assert session.connected


async def test_filters_added_and_removed_at_run_time_follow_the_session() -> None:
    """All filters go in the first SUBSCRIBE; one added while connected is subscribed at
    once, one removed is unsubscribed; changes made while away are made on the next
    connection even when the broker kept the session."""
    sources = ("devices/+/telemetry", "tele/+/SENSOR")
    async with (
        ScriptedBroker() as broker,
        session_with(broker, subscriptions=sources) as (session, _),
    ):
        first = await broker.connection(0)
        assert first.subscribe is not None
        assert first.subscribe.filters == list(sources)
        session.subscribe(["ha/bedroom/state", "tele/+/SENSOR"])
        session.unsubscribe(["tele/+/SENSOR"])
        await until(lambda: len(first.changes) == 2, 5, "the two changes")
        assert [(p.kind, p.filters) for p in first.changes] == [
            (8, ["ha/bedroom/state"]), (10, ["tele/+/SENSOR"])
        ]  # fmt: skip
        assert len({p.packet_id for p in first.changes} | {first.subscribe.packet_id}) == 3
        broker.session_present = True
        first.drop()
        session.subscribe(["ha/hall/state"])
        session.unsubscribe(["ha/bedroom/state"])
        second = await broker.connection(1)
        await until(lambda: second.subscribe is not None and bool(second.changes), 5, "changes")
    assert second.subscribe is not None
    assert second.subscribe.filters == ["devices/+/telemetry"]
    assert [(p.kind, p.filters) for p in second.changes] == [
        (8, ["ha/hall/state"]), (10, ["ha/bedroom/state"])
    ]  # fmt: skip
    assert session.subscriptions == ("devices/+/telemetry", "ha/hall/state")


async def test_a_filter_added_at_run_time_and_refused_never_ends_the_session() -> None:
    """A learned filter the broker refuses (an ACL) is dropped with an error logged, now and
    when a new session subscribes everything again: only the options' filters are vital."""
    async with ScriptedBroker() as broker:
        broker.refuse = {"$SYS/uptime"}
        async with session_with(broker) as (session, _):
            first = await broker.connection(0)
            session.subscribe(["$SYS/uptime", "ha/hall/state"])
            await until(lambda: session.subscriptions == ("devices/+/telemetry", "ha/hall/state"),
                        5, "the refused filter dropped")  # fmt: skip
            session.subscribe(["$SYS/uptime"])  # learned again: not asked for again
            first.drop()
            second = await broker.connection(1)
            await until(lambda: bool(second.changes), 5, "the learned filter subscribed")
            assert session.connected
    assert second.subscribe is not None
    assert second.subscribe.filters == ["devices/+/telemetry"]
    assert [p.filters for p in second.changes] == [["ha/hall/state"]]


@pytest.mark.parametrize(
    ("connack", "suback", "message"),
    [
        (0x86, 1, "refused the connection: bad user name or password"),
        (0x87, 1, "refused the connection: not authorized"),
        (0, 0x87, "refused devices/+/telemetry: not authorized"),
        (0, 0, "granted devices/+/telemetry at QoS 0 only"),
    ],
)
async def test_refusals_are_one_line_with_the_reason(
    connack: int, suback: int, message: str
) -> None:
    """A refused login or subscription is an error naming the broker and the reason."""
    async with ScriptedBroker() as broker:
        broker.connack_code, broker.suback_code = connack, suback
        port = broker.port
        session = MqttSession(options(port), lambda messages: None)
        with pytest.raises(IotgwError) as error:
            await session.connect()
    text = str(error.value)
    assert text.startswith(f"the MQTT broker at mqtt://127.0.0.1:{port} ")
    assert message in text
    assert "secret" not in text
    assert "\n" not in text


async def test_an_unreachable_broker_is_one_line() -> None:
    """Nobody listening: an error that says where."""
    async with ScriptedBroker() as broker:
        port = broker.port
    session = MqttSession(options(port), lambda messages: None)
    with pytest.raises(IotgwError, match=f"MQTT broker unreachable at mqtt://127.0.0.1:{port}"):
        await session.connect()


async def test_a_malformed_packet_drops_the_connection_and_it_comes_back() -> None:
    """A QoS 2 PUBLISH (not possible on our QoS 1 subscription) is a protocol error: the
    session drops the connection, reconnects, and its messages come again."""
    async with ScriptedBroker() as broker, session_with(broker) as (session, owner):
        first = await broker.connection(0)
        name = TOPIC.encode()
        body = struct.pack("!H", len(name)) + name + b"\x00\x09\x00{}"
        first.send(bytes([0x34, len(body)]) + body)
        second = await broker.connection(1)
        await until(lambda: session.connected, 5, "reconnected")
        second.send(publish(TOPIC, b"{}", 9))
        await until(lambda: len(owner.messages) == 1, 5, "the message again")
        session.complete([owner.messages[0].index])
        await until(lambda: second.acks == [9], 5, "acknowledged")


async def test_a_kept_sessions_backlog_ahead_of_the_suback_does_not_stall_the_start() -> None:
    """The broker kept the session and sends 30 queued readings right after the CONNACK,
    ahead of the SUBACK, against a limit of 10: connect() returns at once, the readings
    flow as they are acknowledged, and the SUBACK behind them is read."""
    async with ScriptedBroker() as broker:
        broker.session_present = True
        broker.backlog = b"".join(publish(TOPIC, b"{}", i) for i in range(1, 31))
        async with session_with(broker, max_in_flight=10) as (session, owner):
            connection = await broker.connection(0)
            await complete_as_they_come(session, owner, 30)
            await until(lambda: len(connection.acks) == 30, 5, "every PUBACK")
            await until(lambda: session.subscribed, 5, "the SUBACK read")
    assert connection.subscribe is not None
    assert owner.peak <= 10


async def test_a_refused_subscription_on_a_reconnect_ends_the_session() -> None:
    """The broker lost the session and now refuses the subscription (say, a changed ACL):
    the session does not go on receiving nothing; run() raises the refusal."""
    async with ScriptedBroker() as broker:
        owner = Owner()
        session = MqttSession(options(broker.port), owner.take)
        owner.session = session
        await session.connect()
        running = asyncio.create_task(session.run())
        first = await broker.connection(0)
        broker.suback_code = 0x87
        first.drop()
        with pytest.raises(IotgwError, match="refused devices/\\+/telemetry: not authorized"):
            await asyncio.wait_for(running, 10)
        assert not session.subscribed
        session.close()


async def test_a_publish_shorter_than_its_fields_is_a_protocol_error() -> None:
    """A PUBLISH whose remaining length (2) ends inside its topic: the session drops the
    connection rather than read the topic and packet id from the next packet, and
    acknowledges nothing it did not receive."""
    async with ScriptedBroker() as broker, session_with(broker) as (session, owner):
        first = await broker.connection(0)
        first.send(b"\x32\x02\x00\x14" + publish(TOPIC, b"{}", 7))
        await broker.connection(1)
        await until(lambda: session.connected, 5, "reconnected")
        assert owner.messages == []
        assert first.acks == []


async def test_an_oversized_publish_is_handed_over_by_its_start_and_its_size() -> None:
    """A 3 MiB payload: the session hands over its first 64 KiB with its true size and
    drops the rest as it arrives (memory stays bounded), then reads the next message."""
    payload = b"x" * (3 * 1024 * 1024)
    async with ScriptedBroker() as broker, session_with(broker) as (session, owner):
        connection = await broker.connection(0)
        connection.send(publish(TOPIC, payload, 1) + publish(TOPIC, b"{}", 2))
        await until(lambda: len(owner.messages) == 2, 10, "both messages")
        big, small = owner.messages
        assert (len(big.payload), big.size) == (KEPT_PAYLOAD_BYTES, len(payload))
        assert (small.payload, small.size) == (b"{}", 2)
        session.complete([big.index, small.index])
        await until(lambda: connection.acks == [1, 2], 5, "both PUBACKs")
