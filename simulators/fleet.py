"""A fleet of simulated devices: who they are, what they send, and the faults they make."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.topics import telemetry_topic
from schemas import Device, DeviceType
from simulators.models import MODELS, DeviceModel

SITES = ["oak-street", "harbour-flat", "lake-house", "mill-lofts", "office-3f", "school-annex"]
ROOMS = ["kitchen", "living-room", "bedroom", "hall", "bathroom", "office", "garage"]
TYPE_ORDER = [
    DeviceType.THERMOSTAT,
    DeviceType.MOTION,
    DeviceType.CONTACT,
    DeviceType.SMART_PLUG,
    DeviceType.AIR_QUALITY,
]

# Fault kinds and the dead-letter reason each must produce (None: the reading is valid).
FAULTS: dict[str, str | None] = {
    "malformed": "malformed",
    "schema": "schema",
    "unknown_device": "unknown_device",
    "naive_ts": "schema",
    "clock_skew": "clock_skew",
    "oversize": "too_large",
    "duplicate": None,
    "out_of_order": None,
    "burst": None,
    "offline": None,
}
DEMO_FAULTS = (
    "malformed=0.002,schema=0.002,unknown_device=0.002,clock_skew=0.002,duplicate=0.002,"
    "offline=0.003"
)
_BURST = 20


def parse_faults(spec: str) -> dict[str, float]:
    """`kind=rate,...` (rates per reading, 0 to 1); ValueError with a one-line reason."""
    faults: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, rate = part.partition("=")
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}: use {', '.join(FAULTS)}")
        try:
            value = float(rate) if sep else -1.0
        except ValueError:
            value = -1.0
        if not 0 <= value <= 1:
            raise ValueError(f"fault {kind} needs a rate from 0 to 1, like {kind}=0.01")
        faults[kind] = value
    return faults


@dataclass
class SimDevice:
    """A device of the fleet and its signal model."""

    device_id: str
    type: DeviceType
    site: str
    room: str
    model: DeviceModel
    seq: int = 0
    last_step: float = 0.0
    last_ts: int = 0
    offline_until: float = 0.0

    def record(self) -> Device:
        name = f"{self.room.replace('-', ' ')} {self.type.value.replace('_', ' ')}"
        return Device(
            device_id=self.device_id,
            type=self.type,
            name=name,
            site=self.site,
            room=self.room,
            registered_at=0,
        )


def build_fleet(count: int, seed: int) -> list[SimDevice]:
    """`count` devices over sites and rooms, types in turn; the same seed, the same fleet."""
    rng = random.Random(seed)
    devices = []
    for i in range(count):
        device_type = TYPE_ORDER[i % len(TYPE_ORDER)]
        site = SITES[(i // 12) % len(SITES)]
        room = ROOMS[rng.randrange(len(ROOMS))]
        short = device_type.value.replace("_", "")
        device_id = f"sim-{seed}-{short}-{i:05d}"
        model = MODELS[device_type](random.Random(rng.getrandbits(64)))
        devices.append(SimDevice(device_id, device_type, site, room, model))
    return devices


@dataclass(frozen=True)
class Sent:
    """One reading as the log records it."""

    device_id: str
    seq: int
    ts: int | str
    fault: str | None

    def json_line(self) -> str:
        return json.dumps(
            {"device_id": self.device_id, "seq": self.seq, "ts": self.ts, "fault": self.fault}
        )


@dataclass(frozen=True)
class Message:
    """An MQTT message to publish and the readings it carries."""

    topic: str
    payload: bytes
    readings: list[Sent] = field(default_factory=list)


def _iso_naive(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class FleetTraffic:
    """What the fleet sends, message by message, faults included (pure, seeded).

    Each device's `seq` increases from `first_seq`, which the simulator sets from the
    start time so that runs never reuse a (device, seq) pair.
    """

    def __init__(
        self,
        devices: list[SimDevice],
        faults: dict[str, float],
        seed: int,
        *,
        first_seq: int = 0,
        batch_size: int = 1,
    ) -> None:
        self.devices = devices
        self.faults = faults
        self.rng = random.Random(seed ^ 0x5EED)
        self.batch_size = batch_size
        for device in devices:
            device.seq = first_seq

    def messages(self, device: SimDevice, now: float) -> list[Message]:
        """The messages `device` sends at `now` (epoch seconds): usually one."""
        if now < device.offline_until:
            return []
        fault = self._draw_fault()
        if fault == "offline":
            device.offline_until = now + self.rng.uniform(5, 30)
            return []
        if fault == "burst":
            return [self._single(device, now, fault) for _ in range(_BURST)]
        if fault == "out_of_order":
            first, second = self._single(device, now, None), self._single(device, now, fault)
            return [second, first]
        if fault == "duplicate":
            message = self._single(device, now, None)
            again = Sent(device.device_id, message.readings[0].seq, message.readings[0].ts, fault)
            return [message, Message(message.topic, message.payload, [again])]
        if fault is not None:
            return [self._single(device, now, fault)]
        if self.batch_size > 1:
            readings = [self._reading(device, now) for _ in range(self.batch_size)]
            sent = [Sent(device.device_id, r["seq"], r["ts"], None) for r in readings]
            return [Message(telemetry_topic(device.device_id), json.dumps(readings).encode(), sent)]
        return [self._single(device, now, None)]

    def _draw_fault(self) -> str | None:
        for kind, rate in self.faults.items():
            if rate and self.rng.random() < rate:
                return kind
        return None

    def _reading(self, device: SimDevice, now: float) -> dict[str, Any]:
        dt = now - device.last_step if device.last_step else 10.0
        device.last_step = now
        metrics = device.model.step(now, max(dt, 0.001))
        # A device's readings are at least a millisecond apart: InfluxDB keeps one point per
        # series and time, so two in the same millisecond would be one point.
        device.last_ts = max(int(now * 1000), device.last_ts + 1)
        reading = {
            "type": device.type.value,
            "ts": device.last_ts,
            "seq": device.seq,
            "metrics": metrics,
        }
        device.seq += 1
        return reading

    def _single(self, device: SimDevice, now: float, fault: str | None) -> Message:
        reading = self._reading(device, now)
        device_id = device.device_id
        if fault == "schema":
            number = next(k for k, v in reading["metrics"].items() if not isinstance(v, bool))
            reading["metrics"][number] = 1e9
        elif fault == "naive_ts":
            reading["ts"] = _iso_naive(reading["ts"])
        elif fault == "clock_skew":
            reading["ts"] += 3_600_000
        elif fault == "unknown_device":
            device_id = f"sim-ghost-{self.rng.randrange(10**6):06d}"
        elif fault == "oversize":
            reading["note"] = "x" * 70_000
        payload = json.dumps(reading).encode()
        if fault == "malformed":
            payload = payload[: len(payload) // 2]
        sent = Sent(device_id, reading["seq"], reading["ts"], fault)
        return Message(telemetry_topic(device_id), payload, [sent])
