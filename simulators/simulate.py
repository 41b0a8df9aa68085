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

from gateway.errors import IotgwError
from gateway.mqtt import connect, publish_in_window
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
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


class _Connection:
    def __init__(self, settings: Settings, qos: int) -> None:
        self.unacknowledged = PersistentStorage()
        self.client = Client(
            f"iotgw-sim-{uuid.uuid4().hex[:10]}", persistent_storage=self.unacknowledged
        )
        self.settings = settings
        self.qos = qos

    async def connect(self) -> None:
        await connect(
            self.client, self.settings.mqtt, ca_file=self.settings.mqtt_ca_file,
            timeout_s=self.settings.timeout_s,
        )  # fmt: skip

    async def publish(self, message: Message) -> None:
        await publish_in_window(self.client, message.topic, message.payload, self.qos)

    async def close(self, timeout_s: float) -> None:
        if self.qos:
            await asyncio.wait_for(self.unacknowledged.wait_empty(), timeout_s)
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
                        if sent.fault:
                            stats.faults[sent.fault] += 1
                        if log is not None:
                            log.write(sent.json_line() + "\n")
            if on_progress is not None:
                on_progress(stats)
            await asyncio.sleep(_TICK_S)
    finally:
        closed = await asyncio.gather(*(c.close(60) for c in connections), return_exceptions=True)
    if any(isinstance(outcome, BaseException) for outcome in closed):
        raise IotgwError("the broker did not acknowledge every reading within 60 s")
    if on_progress is not None:
        on_progress(stats)
    return stats
