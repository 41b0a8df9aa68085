"""The canonical reading, as a type (DESIGN.md, "Kafka"); alerts are domain/rules.py's
Alert, dead letters domain/validation.py's Rejected."""

from __future__ import annotations

from typing import TypedDict

__all__ = ["AvailabilityRecord", "CanonicalReading", "DeviceState", "MetricState", "MetricValue"]

MetricValue = float | int | bool


class CanonicalReading(TypedDict):
    """A record of `iot.readings`: a validated reading, normalised."""

    device_id: str
    type: str
    ts: int  # the device's time, epoch ms
    seq: int | None
    metrics: dict[str, MetricValue]
    received_at: int  # when the bridge received it, epoch ms


class AvailabilityRecord(TypedDict):
    """A record of `iot.availability`: a device said it is online, or its last will fired."""

    device_id: str
    online: bool
    ts: int  # when the bridge received the message, epoch ms
    source: str  # the device source (`zigbee2mqtt`, `tasmota`, `shelly`) or `envelope`


class MetricState(TypedDict):
    """A metric's last value in a device's state, and the reading time it came with."""

    value: MetricValue
    ts: int


class DeviceState(TypedDict):
    """A record of `iot.devices.state` (compacted, key device_id): each metric's last value
    (partial readings fill in over the previous state), when the device was last heard
    (`last_seen`: the newest reading's ts), and whether it is online (None: never said)."""

    device_id: str
    type: str | None
    metrics: dict[str, MetricState]
    last_seen: int | None
    online: bool | None
    online_ts: int | None  # the newest availability record's ts, epoch ms
    # When `online` changed to what it is: a broker or bridge restart sends retained
    # availability messages again, which move `online_ts` but not this.
    online_since: int | None
