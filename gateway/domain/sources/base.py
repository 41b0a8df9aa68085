"""What every device source's adapter shares: its readings, its errors, ids, topics, types."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pydantic_core import from_json

from gateway.domain.deadletters import Reason

__all__ = [
    "HPA_PER_MMHG",
    "LATEST_MS",
    "Adapter",
    "AvailabilityAdapter",
    "SourceError",
    "SourceReading",
    "device_id_of",
    "fahrenheit_to_celsius",
    "infer_type",
    "on_off",
    "parse_json_object",
    "parse_time",
    "presence_word",
    "topic_matches",
]

_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")


# A fleet's ids repeat message after message: each is made once (up to this many).
@functools.lru_cache(maxsize=100_000)
def device_id_of(native: str, prefix: str = "") -> str:
    """DESIGN.md's rule: the source's prefix and the native id, every character outside
    `[A-Za-z0-9_-]` replaced by `_`, cut to 64."""
    return _NOT_ID.sub("_", prefix + native)[:64]


# Unit conversions more than one source needs.
HPA_PER_MMHG = 1.33322


def fahrenheit_to_celsius(value: float) -> float:
    return (value - 32) * 5 / 9


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether `topic` matches the MQTT filter `pattern` (`+` one level, `#` the rest)."""
    levels = topic.split("/")
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(parts) == len(levels)


class SourceError(Exception):
    """A message an adapter cannot read: a dead letter with this reason and detail."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class SourceReading:
    """One device's reading as an adapter read it: canonical metrics (units converted),
    where each came from, the fields it did not map, and the device's time if it sent one
    (epoch ms; a datetime without a zone is the device's local time)."""

    device_id: str
    metrics: dict[str, Any]
    origin: dict[str, str]
    ignored: list[str] = field(default_factory=list)
    ts: int | datetime | None = None


class Adapter(Protocol):
    """A device source: the MQTT filters it reads and how it turns a message into readings."""

    name: str

    @property
    def filters(self) -> tuple[str, ...]:
        """What the bridge subscribes to for this source."""
        ...

    def device_of(self, topic: str) -> str | None:
        """The device id of a reading topic of this source; None if it is not one."""
        ...

    def decode(self, topic: str, payload: bytes) -> list[SourceReading]:
        """The readings of one message (none: nothing to ingest); SourceError if it is not
        this source's format."""
        ...


class AvailabilityAdapter(Adapter, Protocol):
    """A device source whose devices also say whether they are online."""

    def presence_of(self, topic: str) -> str | None:
        """The device id of an availability topic of this source; None if it is not one."""
        ...

    def presence(self, payload: bytes) -> bool:
        """Whether an availability message says online; SourceError if it says neither."""
        ...


def presence_word(payload: bytes, online: bytes, offline: bytes, what: str) -> bool:
    """An availability payload that is one of two words (surrounding space ignored)."""
    word = payload.strip()
    if word == online:
        return True
    if word == offline:
        return False
    words = f"{online.decode()!r} or {offline.decode()!r}"
    shown = word[:40].decode(errors="replace")
    raise SourceError(Reason.MALFORMED, f"{what} must be {words}, not {shown!r}")


def on_off(value: Any, on: str = "ON", off: str = "OFF") -> Any:
    """A switch state as a bool; anything else is left as is, for validation to refuse."""
    if value == on:
        return True
    if value == off:
        return False
    return value


# Type inference (DESIGN.md, "Device sources"): the first rule whose metrics a device sent.
# A plug is not told by its voltage alone: battery sensors report theirs too.
_INFERENCE: tuple[tuple[str, frozenset[str]], ...] = (
    ("thermostat", frozenset({"setpoint_c", "heating"})),
    ("air_quality", frozenset({"co2_ppm", "pm2_5_ugm3", "voc_index"})),
    ("motion", frozenset({"motion", "lux"})),
    ("contact", frozenset({"open"})),
    ("smart_plug", frozenset({"on", "power_w", "current_a", "energy_kwh"})),
    ("climate", frozenset({"temperature_c", "humidity_pct", "pressure_hpa"})),
)


def infer_type(metrics: set[str] | frozenset[str] | dict[str, Any]) -> str | None:
    """The built-in type a device most likely is, from the canonical metrics it sent."""
    for name, telling in _INFERENCE:
        if not telling.isdisjoint(metrics):
            return name
    return None


def parse_json_object(payload: bytes, what: str) -> dict[str, Any]:
    """The payload as a JSON object; SourceError(malformed) if it is not one."""
    try:
        document = from_json(payload, allow_inf_nan=False)
    except ValueError as exc:
        raise SourceError(Reason.MALFORMED, f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise SourceError(Reason.MALFORMED, f"{what} must be a JSON object")
    return document


# The latest device time taken: the end of year 9999, as our envelope's `ts`.
LATEST_MS = 253_402_300_799_999


def parse_time(value: Any, field_name: str) -> int | datetime:
    """A device time: epoch ms as is; ISO 8601 text as epoch ms if it has an offset, as a
    local datetime if not. SourceError(schema) otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= LATEST_MS:
        return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                return parsed
            return int(parsed.timestamp() * 1000)
    raise SourceError(Reason.SCHEMA, f"{field_name}: not a time: {str(value)[:40]!r}")
