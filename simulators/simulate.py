"""Runs a simulated fleet against the MQTT broker: paced, bounded in time, logged."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from gmqtt import Client
from gmqtt import Message as MqttMessage
from gmqtt.storage import PersistentStorage

from gateway.adapters.mqtt import connect, publish_in_window
from gateway.errors import IotgwError
from gateway.settings import Settings
from simulators.fleet import FleetTraffic, Message, SimDevice, Uplink, UplinkKind, plan_uplinks
from simulators.formats import Presence, presence

_TICK_S = 0.05


@dataclass
class SimulationStats:
    """What the simulation sent so far."""

    messages: int = 0
    readings: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    # Per device: how often it dropped out (its will, or Zigbee2MQTT, said it is offline)
    # and how often it came back online.
    drops: Counter[str] = field(default_factory=Counter)
    returns: Counter[str] = field(default_factory=Counter)
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
    """A careful device's outbox: the QoS 1 messages the broker has not acknowledged.

    gmqtt drops them when the broker answers a reconnect without the old session (a broker
    that crashed before saving it, say). A device must not: it was never told they were
    received. They are kept as orphans (topic, payload, retained) and published again on
    the new session.
    """

    def __init__(self) -> None:
        super().__init__()
        self.orphans: list[tuple[str, bytes, bool]] = []

    def clear(self) -> None:
        for _, packet in self.get_all():
            topic, payload = _topic_and_payload(packet)
            self.orphans.append((topic, payload, bool(packet[0] & 0x01)))  # the RETAIN flag
        super().clear()


def _cut(client: Client) -> None:
    """Close `client`'s socket without a DISCONNECT, as a device that loses power or its
    Wi-Fi does: the broker then publishes its last will. gmqtt (0.8) has no call for it:
    its connection's transport is aborted, and the client made inactive first, so that
    it neither reconnects by itself nor tries to say DISCONNECT on the closed socket."""
    client._is_active = False
    client._connection._transport.abort()


class _Connection:
    """One MQTT connection of the fleet (an Uplink), its outbox, and the availability of its
    devices: said on every connect, when a device drops out and comes back, and at the end.
    """

    def __init__(
        self, settings: Settings, qos: int, uplink: Uplink, stats: SimulationStats
    ) -> None:
        self.outbox = _Outbox()
        will = uplink.will
        # Like a device: a session that outlives a broker restart, so QoS 1 messages the
        # broker did not acknowledge are sent again after reconnecting (every second).
        self.client = Client(
            f"iotgw-sim-{uuid.uuid4().hex[:10]}",
            persistent_storage=self.outbox,
            session_expiry_interval=_SESSION_EXPIRY_S,
            will_message=None if will is None else MqttMessage(*will, qos=1, retain=True),
        )
        self.client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        self.client.on_connect = self._on_connect
        self.settings = settings
        self.qos = qos
        self.uplink = uplink
        self.stats = stats
        # Devices that dropped out, and when each comes back (epoch seconds).
        self.away: dict[str, float] = {}
        self._hellos: set[asyncio.Future[None]] = set()
        self._return: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def _on_connect(self, *_: Any) -> None:
        # On every connect, a reconnect after a broker restart too, as the firmwares do.
        hello = asyncio.ensure_future(self._say(self.uplink.hello(self.away)))
        self._hellos.add(hello)
        hello.add_done_callback(self._hellos.discard)

    async def _say(self, messages: list[Presence]) -> None:
        for topic, payload in messages:
            await publish_in_window(self.client, topic, payload, 1, retain=True)

    async def connect(self) -> None:
        """Connect; returns once its devices said they are online."""
        await connect(
            self.client, self.settings.mqtt, ca_file=self.settings.mqtt_ca_file,
            timeout_s=self.settings.timeout_s,
        )  # fmt: skip
        await asyncio.gather(*self._hellos)

    async def _send_orphans(self) -> None:
        """Publish again, in their order, the messages a lost session dropped."""
        while self.outbox.orphans:
            topic, payload, retain = self.outbox.orphans.pop(0)
            await publish_in_window(self.client, topic, payload, 1, retain=retain)

    async def _drain(self) -> None:
        """Wait until the broker acknowledged every QoS 1 message sent on this connection."""
        # A reconnect without the session may turn the outbox into orphans meanwhile.
        while self.outbox.orphans or not self.outbox.is_empty:
            await self._send_orphans()
            await self.outbox.wait_empty()

    async def publish(self, message: Message) -> None:
        await self._send_orphans()
        await publish_in_window(self.client, message.topic, message.payload, self.qos)

    async def ready(self, device: SimDevice, now: float) -> bool:
        """Whether `device` may send at `now`: not while it is away. A Zigbee device back
        from a drop is announced online first (a device with a connection of its own, by
        its reconnect)."""
        until = self.away.get(device.device_id)
        if until is None:
            return True
        if self.uplink.kind is not UplinkKind.ZIGBEE2MQTT or now < until:
            return False
        await self._back(device)
        return True

    async def drop(self, device: SimDevice) -> None:
        """`device` drops out until its `offline_until`. Its own connection is cut (the
        broker publishes its will) and connects again then; Zigbee2MQTT says it is offline,
        as its availability check does of a device that fell silent, and online when it is
        heard again; a shared connection serves other devices, and stays: it is silent."""
        if self.uplink.kind is UplinkKind.SHARED:
            return
        self.away[device.device_id] = device.offline_until
        if self.uplink.kind is UplinkKind.ZIGBEE2MQTT:
            await self._say([presence(device.firmware, False)])
            self.stats.drops[device.device_id] += 1
        else:
            self._return = asyncio.create_task(self._drop_out(device))

    async def _drop_out(self, device: SimDevice) -> None:
        # Everything it sent acknowledged first: nothing is sent again on the next
        # connection, so nothing is twice in Kafka.
        await self._drain()
        _cut(self.client)
        self.stats.drops[device.device_id] += 1
        away_s = self.away[device.device_id] - time.time()
        while await self._going_on(away_s):
            try:
                await self.connect()
            except IotgwError:
                away_s = 1.0  # the broker is away too: try again, like a device
                continue
            await self._back(device)
            return

    async def _going_on(self, seconds: float) -> bool:
        """Wait `seconds`, less if the simulation stops; whether it goes on."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(seconds, 0))
        return not self._stopping.is_set()

    async def _back(self, device: SimDevice) -> None:
        del self.away[device.device_id]
        await self._say([presence(device.firmware, True)])
        self.stats.returns[device.device_id] += 1

    async def close(self, timeout_s: float) -> None:
        """A clean stop: a device coming back finishes first; then each device still here
        says it is offline (a DISCONNECT discards the will); every message acknowledged.
        A connection cut by a drop is closed already, and its will said offline."""
        self._stopping.set()
        async with asyncio.timeout(timeout_s):
            if self._return is not None:
                await self._return
            if self.uplink.kind is UplinkKind.OWN and self.away:
                return
            await asyncio.gather(*self._hellos)
            await self._say(self.uplink.goodbye(self.away))
            await self._drain()
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

    Each device says it is online before it sends (see fleet.plan_uplinks for which have a
    last will) and offline at the end. Returns once the broker acknowledged every QoS 1
    message: only then were the devices told their readings were received.
    """
    devices = traffic.devices
    stats = SimulationStats()
    connections = [_Connection(settings, qos, uplink, stats) for uplink in plan_uplinks(devices)]
    route = {device.device_id: c for c in connections for device in c.uplink.devices}
    await asyncio.gather(*(c.connect() for c in connections))
    stats.started = time.monotonic()
    steps = turn = 0
    try:
        while stats.seconds < duration:
            due = int(rate * stats.seconds) - steps
            now = time.time()
            for _ in range(max(0, due)):
                steps += 1
                # A device away after a drop passes its turn on: the fleet keeps its rate.
                for _ in devices:
                    device = devices[turn % len(devices)]
                    turn += 1
                    connection = route[device.device_id]
                    if await connection.ready(device, now):
                        break
                else:
                    continue  # every device is away
                dropped = False
                for message in traffic.messages(device, now):
                    await connection.publish(message)
                    stats.messages += 1
                    for sent in message.readings:
                        stats.readings += 1
                        stats.formats[sent.format.value] += 1
                        if sent.fault:
                            stats.faults[sent.fault] += 1
                            dropped |= sent.fault == "drop"
                        if log is not None:
                            log.write(sent.json_line() + "\n")
                if dropped:
                    await connection.drop(device)
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
