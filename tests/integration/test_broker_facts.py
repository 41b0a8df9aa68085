"""Facts about the local stack's Mosquitto (Debian 12's 2.0.11) that the bridge's design
answers, reproduced with a raw MQTT 5 subscriber (README, "Brokers"). If one of these
starts failing, the broker changed: read the README's section again."""

from __future__ import annotations

import asyncio
import struct

import pytest

from devstack import stack
from gateway.settings import Settings
from tests.conftest import unique
from tests.raw_mqtt import packet, read_packet, varint
from tests.support import DevicePublisher, forget_session

pytestmark = pytest.mark.integration

RECEIVE_MAXIMUM = 4


def connect(client_id: str, *, receive_maximum: int, clean: bool) -> bytes:
    properties = struct.pack("!BIBH", 0x11, 300, 0x21, receive_maximum)
    body = b"\x00\x04MQTT\x05" + bytes([0x02 if clean else 0]) + struct.pack("!H", 60)
    name = client_id.encode()
    body += varint(len(properties)) + properties + struct.pack("!H", len(name)) + name
    return packet(0x10, body)


def subscribe(topic_filter: str) -> bytes:
    name = topic_filter.encode()
    return packet(0x82, b"\x00\x01\x00" + struct.pack("!H", len(name)) + name + b"\x01")


def puback(packet_id: int) -> bytes:
    return packet(0x40, struct.pack("!H", packet_id))


class RawSubscriber:
    """An MQTT 5 subscriber that acknowledges only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, settings: Settings, client_id: str, topic_filter: str) -> RawSubscriber:
        reader, writer = await asyncio.open_connection(settings.mqtt.host, settings.mqtt.port)
        writer.write(connect(client_id, receive_maximum=RECEIVE_MAXIMUM, clean=False))
        assert (await read_packet(reader)) is not None
        writer.write(subscribe(topic_filter))
        return cls(reader, writer)

    async def until(
        self, arrived: list[tuple[int, int]], enough: int, timeout_s: float = 5
    ) -> None:
        """Read PUBLISHes (packet id, seq) into `arrived` until it holds `enough`."""
        async with asyncio.timeout(timeout_s):
            while len(arrived) < enough:
                received = await read_packet(self.reader)
                assert received is not None
                if received.kind == 3:
                    topic_length = struct.unpack("!H", received.body[:2])[0]
                    at = 2 + topic_length
                    packet_id = struct.unpack("!H", received.body[at : at + 2])[0]
                    arrived.append((packet_id, int(received.body[at + 3 :])))

    def close(self) -> None:
        self.writer.write(b"\xe0\x00")
        self.writer.close()


async def test_mosquitto_2_0_11_exceeds_the_receive_maximum_and_reorders_a_device(
    settings: Settings,
) -> None:
    """Receive maximum 4, 20 readings of one device queued. Acknowledging the oldest lets
    the broker put four more in flight (8 unacknowledged against a maximum of 4); then
    acknowledging the newest in flight (out of order, as a bridge acknowledging by Kafka
    partition would) lets the device's next reading overtake its 12 queued ones. Fixed
    upstream in 2.0.13 (#2306); the bridge therefore acknowledges in arrival order and
    bounds what it reads itself."""
    # The local stack's broker: Debian 12's. Another version changes the facts.
    assert stack.mosquitto_version() == (2, 0, 11), "not Debian 12's Mosquitto: see the README"
    device, client_id = unique("dev"), unique("raw")
    topic = f"devices/{device}/telemetry"
    subscriber = await RawSubscriber.open(settings, client_id, topic)
    arrived: list[tuple[int, int]] = []
    try:
        async with DevicePublisher(settings.mqtt.host, settings.mqtt.port) as publisher:
            for seq in range(20):
                await publisher.publish(topic, str(seq).encode())
            await subscriber.until(arrived, RECEIVE_MAXIMUM)
            subscriber.writer.write(puback(arrived[0][0]))  # the oldest
            # A correct broker sends one more; 2.0.11 moves four queued ones into flight.
            await subscriber.until(arrived, 2 * RECEIVE_MAXIMUM)
            subscriber.writer.write(puback(arrived[-1][0]))  # the newest in flight
            await publisher.publish(topic, b"20")
            await subscriber.until(arrived, 2 * RECEIVE_MAXIMUM + 1)
    finally:
        subscriber.close()
        await forget_session(settings.model_copy(update={"mqtt_client_id": client_id}))
    assert [seq for _, seq in arrived] == [*range(8), 20]  # 8 to 19 still queued
