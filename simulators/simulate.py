"""Runs a simulated fleet against the MQTT broker: paced, bounded in time, logged."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from gmqtt import Client
from gmqtt.storage import PersistentStorage

from gateway.adapters.mqtt import connect, publish_in_window
from gateway.errors import IotgwError
from gateway.settings import Settings
from simulators.fleet import FleetTraffic, Message

# Devices share this many MQTT connections at most (a device always uses the same one,
# so MQTT keeps its order).
MAX_CONNECTIONS = 20
_TICK_S = 0.05


@dataclass
class SimulationStats:
    """What the simulation sent so far."""

    messages: int = 0
    readings: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    # Readings by the format the device sent them in (envelope, zigbee2mqtt, ...).
    formats: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def seconds(self) -> float:
        """How long it has been sending (once it is over: how long it sent)."""
        return (self.finished or time.monotonic()) - self.started


# How long the broker keeps a simulated device's session while it is away.
_SESSION_EXPIRY_S = 120


def _topic_and_payload(packet: bytes) -> tuple[str, bytes]:
    """The topic and payload of an MQTT 5 QoS 1 PUBLISH packet as gmqtt stored it."""
    at = 1
    while packet[at] & 0x80:  # the fixed header's remaining length (a varint)
        at += 1
    at += 1
    size = int.from_bytes(packet[at : at + 2], "big")
    topic = packet[at + 2 : at + 2 + size].decode()
    at += 2 + size + 2  # the topic, then the packet id
    properties, shift = 0, 0
    while True:
        byte = packet[at]
        at += 1
        properties |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return topic, packet[at + properties :]


class _Outbox(PersistentStorage):  # type: ignore[misc]
    """A careful device's outbox: the QoS 1 readings the broker has not acknowledged.

    gmqtt drops them when the broker answers a reconnect without the old session (a broker
    that crashed before saving it, say). A device must not: it was never told they were
    received. They are kept as orphans and published again on the new session.
    """

    def __init__(self) -> None:
        super().__init__()
        self.orphans: list[tuple[str, bytes]] = []

    def clear(self) -> None:
        self.orphans += [_topic_and_payload(packet) for _, packet in self.get_all()]
        super().clear()


class _Connection:
    def __init__(self, settings: Settings, qos: int) -> None:
        self.outbox = _Outbox()
        # Like a device: a session that outlives a broker restart, so QoS 1 readings the
        # broker did not acknowledge are sent again after reconnecting (every second).
        self.client = Client(
            f"iotgw-sim-{uuid.uuid4().hex[:10]}",
            persistent_storage=self.outbox,
            session_expiry_interval=_SESSION_EXPIRY_S,
        )
        self.client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        self.settings = settings
        self.qos = qos

    async def connect(self) -> None:
        await connect(
            self.client, self.settings.mqtt, ca_file=self.settings.mqtt_ca_file,
            timeout_s=self.settings.timeout_s,
        )  # fmt: skip

    async def _send_orphans(self) -> None:
        """Publish again, in their order, the readings a lost session dropped."""
        while self.outbox.orphans:
            topic, payload = self.outbox.orphans.pop(0)
            await publish_in_window(self.client, topic, payload, self.qos)

    async def publish(self, message: Message) -> None:
        await self._send_orphans()
        await publish_in_window(self.client, message.topic, message.payload, self.qos)

    async def close(self, timeout_s: float) -> None:
        if self.qos:
            async with asyncio.timeout(timeout_s):
                # A reconnect without the session may turn the outbox into orphans meanwhile.
                while self.outbox.orphans or not self.outbox.is_empty:
                    await self._send_orphans()
                    await self.outbox.wait_empty()
        await self.client.disconnect()


async def simulate(
    settings: Settings,
    traffic: FleetTraffic,
    *,
    rate: float,
    duration: float,
    qos: int = 1,
    log: TextIO | None = None,
    on_progress: Callable[[SimulationStats], None] | None = None,
) -> SimulationStats:
    """Send `rate` readings per second, round-robin over the fleet, for `duration` seconds.

    Returns once the broker acknowledged every QoS 1 message: only then were the
    devices told their readings were received.
    """
    devices = traffic.devices
    connections = [_Connection(settings, qos) for _ in range(min(len(devices), MAX_CONNECTIONS))]
    await asyncio.gather(*(c.connect() for c in connections))
    stats = SimulationStats()
    steps = 0
    try:
        while stats.seconds < duration:
            due = int(rate * stats.seconds) - steps
            now = time.time()
            for _ in range(max(0, due)):
                index = steps % len(devices)
                steps += 1
                for message in traffic.messages(devices[index], now):
                    await connections[index % len(connections)].publish(message)
                    stats.messages += 1
                    for sent in message.readings:
                        stats.readings += 1
                        stats.formats[sent.format.value] += 1
                        if sent.fault:
                            stats.faults[sent.fault] += 1
                        if log is not None:
                            log.write(sent.json_line() + "\n")
            if on_progress is not None:
                on_progress(stats)
            await asyncio.sleep(_TICK_S)
    finally:
        closed = await asyncio.gather(*(c.close(60) for c in connections), return_exceptions=True)
    stats.finished = time.monotonic()
    if any(isinstance(outcome, BaseException) for outcome in closed):
        raise IotgwError("the broker did not acknowledge every reading within 60 s")
    if on_progress is not None:
        on_progress(stats)
    return stats
