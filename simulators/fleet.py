"""A fleet of simulated devices: who they are, what they send, and the faults they make."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Container
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from gateway.topics import telemetry_topic
from schemas import Device, DeviceType
from schemas.types import BUILTIN_CATALOGUE, TypeCatalogue
from simulators.formats import (
    CLOCK_MS,
    FORMAT_TYPES,
    Firmware,
    Format,
    Payload,
    Presence,
    bridge_state,
    presence,
    shelly,
    tasmota_sensor,
    tasmota_state,
    zigbee2mqtt,
)
from simulators.models import DeviceModel, model_for

SITES = ["oak-street", "harbour-flat", "lake-house", "mill-lofts", "office-3f", "school-annex"]
ROOMS = ["kitchen", "living-room", "bedroom", "hall", "bathroom", "office", "garage"]
TYPE_ORDER = [
    DeviceType.THERMOSTAT,
    DeviceType.MOTION,
    DeviceType.CONTACT,
    DeviceType.SMART_PLUG,
    DeviceType.AIR_QUALITY,
    DeviceType.CLIMATE,
]
# `--format mixed`: a home as people build them. Zigbee sensors (room climate, motion,
# doors) through Zigbee2MQTT, Wi-Fi plugs on Tasmota and Shelly firmware, a Shelly H&T and
# a Tasmota board with a sensor, and our own envelope's thermostat and air quality meter.
MIXED_HOME: tuple[tuple[Format, DeviceType], ...] = (
    (Format.ZIGBEE2MQTT, DeviceType.CLIMATE),
    (Format.ZIGBEE2MQTT, DeviceType.MOTION),
    (Format.ZIGBEE2MQTT, DeviceType.CONTACT),
    (Format.TASMOTA, DeviceType.SMART_PLUG),
    (Format.SHELLY, DeviceType.SMART_PLUG),
    (Format.ENVELOPE, DeviceType.THERMOSTAT),
    (Format.ZIGBEE2MQTT, DeviceType.CONTACT),
    (Format.ENVELOPE, DeviceType.AIR_QUALITY),
    (Format.SHELLY, DeviceType.CLIMATE),
    (Format.TASMOTA, DeviceType.CLIMATE),
)


class FleetFormat(StrEnum):
    """What a fleet speaks: one format for every device, or `mixed`, the home above."""

    ENVELOPE = "envelope"
    ZIGBEE2MQTT = "zigbee2mqtt"
    TASMOTA = "tasmota"
    SHELLY = "shelly"
    MIXED = "mixed"


FLEET_FORMATS = tuple(f.value for f in FleetFormat)
# The zone of the simulated Tasmota devices' clocks (their `Time` is local time).
TASMOTA_TZ = "Europe/Berlin"

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
    # The reading goes out, then the device's connection drops (see Uplink).
    "drop": None,
}
# Faults only our envelope can carry: in the other formats a time without an offset is
# what the device normally sends. Such faults, drawn for a device of another format, are
# not made (the reading goes out as it is).
ENVELOPE_ONLY_FAULTS = frozenset({"naive_ts"})
DEMO_FAULTS = (
    "malformed=0.002,schema=0.002,unknown_device=0.002,clock_skew=0.002,duplicate=0.002,"
    "offline=0.003,drop=0.002"
)
_BURST = 20
# How long a dropped device stays away, in seconds (drawn evenly): an offline period a
# dashboard shows, over before a demo ends.
DROP_S = (3.0, 12.0)


def parse_faults(spec: str, fleet_format: str = "envelope") -> dict[str, float]:
    """`kind=rate,...` (rates per reading, 0 to 1); ValueError with a one-line reason,
    also for a fault that no device of `fleet_format` can make."""
    faults: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, sep, rate = part.partition("=")
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}: use {', '.join(FAULTS)}")
        if kind in ENVELOPE_ONLY_FAULTS and fleet_format not in ("envelope", "mixed"):
            raise ValueError(f"fault {kind} needs envelope devices, not {fleet_format} ones")
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
    """A device of the fleet, its signal model and its firmware (what it speaks)."""

    device_id: str
    type: str
    site: str
    room: str
    model: DeviceModel
    firmware: Firmware
    seq: int = 0
    last_step: float = 0.0
    last_ts: int = 0
    offline_until: float = 0.0
    # When it first sends (epoch seconds): a device paired mid-run is silent until then.
    joins_at: float = 0.0
    # It makes none of the fleet's faults (an `offline` one could silence it for a whole
    # short run).
    faultless: bool = False
    # A Tasmota plug's relay as it last reported it (`tele/<topic>/STATE`).
    reported_on: bool | None = None

    def __post_init__(self) -> None:
        if self.firmware.device_id != self.device_id:
            raise ValueError(f"{self.device_id}: its firmware's id is {self.firmware.device_id}")
        # Our envelope carries any type, a types file's too; the firmwares their own.
        if self.format is not Format.ENVELOPE and self.type not in FORMAT_TYPES[self.format]:
            raise ValueError(f"a {self.format} device does not play {self.type}")

    @property
    def format(self) -> Format:
        return self.firmware.format

    def record(self) -> Device:
        """Its registry record; a device whose clock sends local time names its zone."""
        name = f"{self.room.replace('-', ' ')} {self.type.replace('_', ' ')}"
        return Device(
            device_id=self.device_id,
            type=self.type,
            name=name,
            site=self.site,
            room=self.room,
            tz=self.firmware.tz if self.format is Format.TASMOTA else None,
            registered_at=0,
        )


def _hex_id(seed: int, index: int, bits: int) -> int:
    """A hardware-like number, the same for a seed and index, different for each index
    of a fleet (an odd step walks through all values before repeating one)."""
    base = int.from_bytes(hashlib.sha256(f"iotgw-sim-{seed}".encode()).digest()[:8])
    return (base + index * 0x9E3779B97F4B) % (1 << bits)


def _firmware(fmt: Format, device_type: str, seed: int, index: int, room: str,
              base_topic: str) -> Firmware:  # fmt: skip
    """The native id and the firmware settings of the fleet's device number `index`."""
    traits = random.Random(f"iotgw-sim-{seed}-{index}")
    short = device_type.replace("_", "")
    if fmt is Format.ZIGBEE2MQTT:
        # A friendly name grouped by room (Zigbee2MQTT nests it in the topic): the device
        # id is the name with each `/` replaced by `_`.
        return Firmware(fmt, f"sim-{seed}/{room}/{short}-{index:05d}", base_topic=base_topic,
                        z2m_v1=traits.random() < 0.5)  # fmt: skip
    if fmt is Format.TASMOTA:
        # Tasmota's default topic: tasmota_ and the last 6 hex digits of the MAC address.
        return Firmware(
            fmt,
            f"tasmota_{_hex_id(seed, index, 24):06X}",
            sensor="BME280" if traits.random() < 0.5 else "AM2301",
            temp_unit="F" if traits.random() < 0.25 else "C",
            tz=TASMOTA_TZ,
            set_option52=traits.random() < 0.25,
        )
    if fmt is Format.SHELLY:
        model = "shellyplusplugs" if device_type == DeviceType.SMART_PLUG else "shellyplusht"
        return Firmware(fmt, f"{model}-{_hex_id(seed, index, 48):012x}")
    return Firmware(fmt, f"sim-{seed}-{short}-{index:05d}")


def check_types(types: list[str] | None, fleet_format: str, catalogue: TypeCatalogue) -> None:
    """ValueError, in one line, unless `fleet_format` is known and plays every type given."""
    if fleet_format not in FLEET_FORMATS:
        raise ValueError(f"unknown format {fleet_format!r}: use {', '.join(FLEET_FORMATS)}")
    if types and fleet_format == "mixed":
        raise ValueError("the mixed home has its own types: choose a format to play types")
    for device_type in types or ():
        catalogue.check_type(device_type)
        fmt = Format(fleet_format)
        if fmt is not Format.ENVELOPE and device_type not in FORMAT_TYPES[fmt]:
            playable = ", ".join(FORMAT_TYPES[fmt])
            raise ValueError(f"a {fmt} device does not play {device_type}: use {playable}")


def build_fleet(
    count: int,
    seed: int,
    fleet_format: str = "envelope",
    *,
    base_topic: str = "zigbee2mqtt",
    types: list[str] | None = None,
    catalogue: TypeCatalogue = BUILTIN_CATALOGUE,
) -> list[SimDevice]:
    """`count` devices over sites and rooms, types in turn (`types`, or every built-in
    type `fleet_format` can play; `mixed`: the home of MIXED_HOME); the same seed, the same
    fleet. A type of the types file (in `catalogue`) plays as our envelope.

    `base_topic` is Zigbee2MQTT's, for its devices.
    """
    check_types(types, fleet_format, catalogue)
    rng = random.Random(seed)
    devices = []
    for i in range(count):
        device_type: str
        if fleet_format == "mixed":
            fmt, device_type = MIXED_HOME[i % len(MIXED_HOME)]
        else:
            fmt = Format(fleet_format)
            rotation = types or [t for t in TYPE_ORDER if t in FORMAT_TYPES[fmt]]
            device_type = rotation[i % len(rotation)]
        site = SITES[(i // 12) % len(SITES)]
        room = ROOMS[rng.randrange(len(ROOMS))]
        model = model_for(device_type, random.Random(rng.getrandbits(64)), catalogue)
        firmware = _firmware(fmt, device_type, seed, i, room, base_topic)
        devices.append(SimDevice(firmware.device_id, device_type, site, room, model, firmware))
    return devices


# A last will belongs to one MQTT connection, so a device has its will only on a connection
# of its own, as a real one: up to OWN_CONNECTIONS devices get one each (one socket each, in
# the simulator and in the broker). The devices past that share SHARED_CONNECTIONS
# connections without a will: they say online on connecting and offline at a clean stop,
# and a drop only silences them (their connection serves others). Zigbee devices never
# connect themselves: Zigbee2MQTT speaks for all of them on one connection, whose will is
# its bridge state, and publishes each device's availability.
OWN_CONNECTIONS = 500
SHARED_CONNECTIONS = 20


class UplinkKind(StrEnum):
    """Who holds an MQTT connection of the fleet."""

    OWN = "own"  # one device, with its last will
    SHARED = "shared"  # devices past OWN_CONNECTIONS, no will
    ZIGBEE2MQTT = "zigbee2mqtt"  # Zigbee2MQTT for its devices, its bridge state as will


@dataclass(frozen=True)
class Uplink:
    """One MQTT connection of the fleet: its devices and what it says of their availability."""

    kind: UplinkKind
    devices: tuple[SimDevice, ...]

    @property
    def will(self) -> Presence | None:
        if self.kind is UplinkKind.OWN:
            return presence(self.devices[0].firmware, False)
        if self.kind is UplinkKind.ZIGBEE2MQTT:
            return bridge_state(self.devices[0].firmware.base_topic, False)
        return None

    def hello(self, away: Container[str] = ()) -> list[Presence]:
        """What it publishes on each connect: each device online, but those `away`."""
        said = [presence(d.firmware, True) for d in self.devices if d.device_id not in away]
        if self.kind is UplinkKind.ZIGBEE2MQTT:
            return [bridge_state(self.devices[0].firmware.base_topic, True), *said]
        return said

    def goodbye(self, away: Container[str] = ()) -> list[Presence]:
        """What it publishes at a clean stop, whose DISCONNECT discards the will: each
        device offline, but those `away` (their offline was said when they dropped)."""
        said = [presence(d.firmware, False) for d in self.devices if d.device_id not in away]
        if self.kind is UplinkKind.ZIGBEE2MQTT:
            return [*said, bridge_state(self.devices[0].firmware.base_topic, False)]
        return said


def plan_uplinks(devices: list[SimDevice], own: int = OWN_CONNECTIONS,
                 shared: int = SHARED_CONNECTIONS) -> list[Uplink]:  # fmt: skip
    """The fleet's MQTT connections: one per device for the first `own` devices that
    connect themselves, one per Zigbee2MQTT base topic, and up to `shared` for the rest (a
    device always on the same one, so MQTT keeps its order)."""
    uplinks: list[Uplink] = []
    zigbee: dict[str, list[SimDevice]] = {}
    rest: list[SimDevice] = []
    for device in devices:
        if device.format is Format.ZIGBEE2MQTT:
            zigbee.setdefault(device.firmware.base_topic, []).append(device)
        elif len(uplinks) < own:
            uplinks.append(Uplink(UplinkKind.OWN, (device,)))
        else:
            rest.append(device)
    uplinks += [Uplink(UplinkKind.ZIGBEE2MQTT, tuple(group)) for group in zigbee.values()]
    lanes = min(shared, len(rest))
    uplinks += [Uplink(UplinkKind.SHARED, tuple(rest[i::lanes])) for i in range(lanes)]
    return uplinks


def digest(payload: bytes) -> str:
    """A short fingerprint of a payload: how the audit recognises a dead letter's bytes."""
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


@dataclass(frozen=True)
class Sent:
    """One reading as the log records it.

    `seq` is the device's reading number; only our envelope carries it. The audit finds an
    envelope reading by its `seq`, a reading of another format by its device time `ts`
    (unique per device); and a dead letter by the `digest` of the payload that carried it.
    """

    device_id: str
    seq: int
    ts: int | str
    fault: str | None
    format: Format = Format.ENVELOPE
    digest: str = ""

    def json_line(self) -> str:
        return json.dumps(
            {
                "device_id": self.device_id,
                "seq": self.seq,
                "ts": self.ts,
                "fault": self.fault,
                "format": self.format.value,
                "digest": self.digest,
            }
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
    start time so that runs never reuse a (device, seq) pair. Device times increase too,
    by at least the resolution of the device's clock: a device never sends two readings
    with one time (InfluxDB keeps one point per series and time, and the audit finds the
    readings of the formats without `seq` by their time).
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
        """The messages `device` sends at `now` (epoch seconds): usually one; none while it
        is offline, or while its clock shows the second of its last reading (Tasmota).
        After a reading of fault `drop` the device is away until its `offline_until`: the
        simulator drops its connection. A device that has not joined yet sends nothing."""
        if now < device.offline_until or now < device.joins_at:
            return []
        resolution = CLOCK_MS[device.format]
        if int(now * 1000) // resolution * resolution <= device.last_ts and resolution > 1:
            return []
        fault = None if device.faultless else self._draw_fault(device.format)
        if fault == "offline":
            device.offline_until = now + self.rng.uniform(5, 30)
            return []
        if fault == "drop":
            device.offline_until = now + self.rng.uniform(*DROP_S)
        if fault == "burst":
            return [self._single(device, now, fault) for _ in range(_BURST)]
        if fault == "out_of_order":
            first, second = self._single(device, now, None), self._single(device, now, fault)
            return [second, first]
        if fault == "duplicate":
            message = self._single(device, now, None)
            again = replace(message.readings[0], fault=fault)
            return [message, Message(message.topic, message.payload, [again])]
        if fault is not None:
            return [self._single(device, now, fault)]
        if self.batch_size > 1 and device.format is Format.ENVELOPE:
            readings = [self._reading(device, now) for _ in range(self.batch_size)]
            payload = json.dumps(readings).encode()
            sent = [
                Sent(device.device_id, r["seq"], r["ts"], None, digest=digest(payload))
                for r in readings
            ]
            return [Message(telemetry_topic(device.device_id), payload, sent)]
        return [self._single(device, now, None)]

    def _draw_fault(self, fmt: Format) -> str | None:
        for kind, rate in self.faults.items():
            if rate and self.rng.random() < rate:
                if kind in ENVELOPE_ONLY_FAULTS and fmt is not Format.ENVELOPE:
                    return None
                return kind
        return None

    def _reading(self, device: SimDevice, now: float) -> dict[str, Any]:
        dt = now - device.last_step if device.last_step else 10.0
        device.last_step = now
        metrics = device.model.step(now, max(dt, 0.001))
        resolution = CLOCK_MS[device.format]
        device.last_ts = max(
            int(now * 1000) // resolution * resolution, device.last_ts + resolution
        )
        reading = {
            "type": device.type,
            "ts": device.last_ts,
            "seq": device.seq,
            "metrics": metrics,
        }
        device.seq += 1
        return reading

    def _single(self, device: SimDevice, now: float, fault: str | None) -> Message:
        reading = self._reading(device, now)
        firmware = device.firmware
        if fault == "schema":
            number = next(k for k, v in reading["metrics"].items() if not isinstance(v, bool))
            reading["metrics"][number] = 1e9
        elif fault == "naive_ts":
            reading["ts"] = _iso_naive(reading["ts"])
        elif fault == "clock_skew":
            reading["ts"] += 3_600_000
        elif fault == "unknown_device":
            firmware = replace(firmware, native_id=f"sim-ghost-{self.rng.randrange(10**6):06d}")
        if firmware.format is Format.ENVELOPE:
            topic, document = telemetry_topic(firmware.device_id), reading
            ts: int | str = reading["ts"]
        else:
            topic, document = self._firmware_payload(device, firmware, reading, fault)
            ts = _device_time(firmware, reading["ts"])
        if fault == "oversize":
            document["note"] = "x" * 70_000
        payload = json.dumps(document).encode()
        if fault == "malformed":
            payload = payload[: len(payload) // 2]
        sent = Sent(firmware.device_id, reading["seq"], ts, fault, firmware.format, digest(payload))
        return Message(topic, payload, [sent])

    def _firmware_payload(
        self, device: SimDevice, firmware: Firmware, reading: dict[str, Any], fault: str | None
    ) -> Payload:
        """The message of a Zigbee2MQTT, Tasmota or Shelly device."""
        metrics, ts = reading["metrics"], reading["ts"]
        if firmware.format is Format.ZIGBEE2MQTT:
            return zigbee2mqtt(firmware, device.type, metrics, ts, self.rng)
        if firmware.format is Format.SHELLY:
            return shelly(firmware, device.type, metrics, ts)
        # A Tasmota plug tells its relay's state in STATE, when it changed, and its energy
        # monitor's figures in SENSOR otherwise (a bad figure: in SENSOR).
        if device.type == DeviceType.SMART_PLUG and fault != "schema":
            on = bool(metrics["on"])
            if on != device.reported_on:
                device.reported_on = on
                return tasmota_state(firmware, on, ts, self.rng)
        return tasmota_sensor(firmware, device.type, metrics, ts)


def _device_time(firmware: Firmware, ts_ms: int) -> int:
    """The device time a payload carries, in epoch milliseconds: the reading's, to the
    resolution of the format's clock (Tasmota's whole seconds)."""
    return ts_ms - ts_ms % CLOCK_MS[firmware.format]
