"""The canonical reading, as a type (DESIGN.md, "Kafka"); alerts are domain/rules.py's
Alert, dead letters domain/validation.py's Rejected."""

from __future__ import annotations

from typing import TypedDict

__all__ = ["CanonicalReading", "MetricValue"]

MetricValue = float | int | bool


class CanonicalReading(TypedDict):
    """A record of `iot.readings`: a validated reading, normalised."""

    device_id: str
    type: str
    ts: int  # the device's time, epoch ms
    seq: int | None
    metrics: dict[str, MetricValue]
    received_at: int  # when the bridge received it, epoch ms
