"""The records iotgw writes to Kafka, as types (DESIGN.md, "Kafka")."""

from __future__ import annotations

from typing import Literal, TypedDict

__all__ = ["AlertRecord", "CanonicalReading", "MetricValue"]

MetricValue = float | int | bool


class CanonicalReading(TypedDict):
    """A record of `iot.readings`: a validated reading, normalised."""

    device_id: str
    type: str
    ts: int  # the device's time, epoch ms
    seq: int | None
    metrics: dict[str, MetricValue]
    received_at: int  # when the bridge received it, epoch ms


class AlertRecord(TypedDict):
    """A record of `iot.alerts`: a rule's transition for a device."""

    rule: str
    device_id: str
    state: Literal["firing", "resolved"]
    value: MetricValue | None
    ts: int
    message: str
