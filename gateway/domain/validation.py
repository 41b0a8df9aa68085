"""From an MQTT message to readings for Kafka or dead letters with a reason (pure logic)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from gateway.domain.deadletters import DETAIL_MAX, Reason
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.records import CanonicalReading
from gateway.topics import telemetry_device_id, telemetry_topic
from schemas import Device, is_device_id
from schemas.reading import MAX_PAYLOAD_BYTES, READING, Reading

__all__ = ["READING_SCHEMA", "Accepted", "Outcome", "ReadingValidator", "Rejected"]

READING_SCHEMA = b"reading/v1"
# Readings further ahead of the bridge's clock than this are rejected (DESIGN.md).
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid reading: canonical JSON for `iot.readings`, keyed by device."""

    device_id: str
    value: bytes
    ts: int


@dataclass(frozen=True, slots=True)
class Rejected:
    """A dead letter: the original bytes and why they were refused."""

    device_id: str | None
    reason: Reason
    detail: str
    original: bytes
    mqtt_topic: str
    received_at: int


Outcome = Accepted | Rejected


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    # The union's tag (e.g. "thermostat") leads every location; the field path is enough.
    loc = [str(part) for part in error["loc"]][1:] or [str(p) for p in error["loc"]]
    message = error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(loc) or 'reading'}: {message}"


class ReadingValidator:
    """Judges every reading of a message: accepted (normalised) or rejected with a reason.

    Checks, in order: size, JSON, schema, payload id against the topic id, registry
    (unknown, disabled, type), clock skew, then the device's rate limit. Each reading of
    a batch is judged on its own, so the valid ones pass.
    """

    def __init__(
        self,
        lookup: Callable[[str], Device | None],
        *,
        require_registration: bool,
        max_age_ms: int,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._require_registration = require_registration
        self._max_age_ms = max_age_ms
        self._limiter = limiter
        self._clock = clock

    def process(
        self, topic: str, payload: bytes, received_at: int, size: int | None = None
    ) -> list[Outcome]:
        """The outcome of each reading of one message. `size` is the payload's size when
        `payload` holds only its first bytes (a message too large to keep whole)."""

        def reject(device_id: str | None, reason: Reason, detail: str, original: bytes) -> Rejected:
            return Rejected(device_id, reason, detail[:DETAIL_MAX], original, topic, received_at)

        device_id = _valid_device_id(topic)
        if device_id is None:
            detail = f"topic {topic[:100]!r} is not devices/<device_id>/telemetry with a valid id"
            return [reject(None, Reason.UNKNOWN_DEVICE, detail, payload[:MAX_PAYLOAD_BYTES])]
        size = len(payload) if size is None else size
        if size > MAX_PAYLOAD_BYTES:
            detail = (
                f"payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}; "
                f"its first {MAX_PAYLOAD_BYTES} bytes are kept"
            )
            return [reject(device_id, Reason.TOO_LARGE, detail, payload[:MAX_PAYLOAD_BYTES])]
        if payload.lstrip()[:1] == b"{":
            # One reading, the common case: parsed and validated in one pass, in Rust.
            try:
                reading = READING.validate_json(payload)
            except ValidationError as exc:
                first = exc.errors(include_url=False, include_input=False)[0]
                if first["type"] == "json_invalid":
                    detail = f"not JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
                    return [reject(device_id, Reason.MALFORMED, detail, payload)]
                return [reject(device_id, Reason.SCHEMA, _first_error(exc), payload)]
            return [self._check(device_id, reading, payload, received_at, reject)]
        try:
            document = from_json(payload, allow_inf_nan=False)
        except ValueError as exc:
            return [reject(device_id, Reason.MALFORMED, f"not JSON: {exc}", payload)]
        if not isinstance(document, list):
            detail = "payload must be a JSON object or array"
            return [reject(device_id, Reason.MALFORMED, detail, payload)]
        if not document:
            return [reject(device_id, Reason.SCHEMA, "empty batch", payload)]
        outcomes: list[Outcome] = []
        for item in document:
            original = _compact(item)
            try:
                reading = READING.validate_python(item)
            except ValidationError as exc:
                outcomes.append(reject(device_id, Reason.SCHEMA, _first_error(exc), original))
                continue
            outcomes.append(self._check(device_id, reading, original, received_at, reject))
        return outcomes

    def _check(
        self,
        device_id: str,
        reading: Reading,
        original: bytes,
        received_at: int,
        reject: Callable[[str | None, Reason, str, bytes], Rejected],
    ) -> Outcome:
        """The checks after the schema: ids, registry, clock, rate; then normalisation."""
        claimed = reading.get("device_id")
        if claimed is not None and claimed != device_id:
            detail = f"payload device_id {claimed} differs from the topic's {device_id}"
            return reject(device_id, Reason.ID_MISMATCH, detail, original)
        kind, ts = reading["type"], reading["ts"]
        device = self._lookup(device_id)
        if device is None:
            if self._require_registration:
                detail = f"device {device_id} is not registered"
                return reject(device_id, Reason.UNKNOWN_DEVICE, detail, original)
        elif not device.enabled:
            detail = f"device {device_id} is disabled"
            return reject(device_id, Reason.DEVICE_DISABLED, detail, original)
        elif device.type != kind:
            detail = f"reading type {kind} but device {device_id} is a {device.type}"
            return reject(device_id, Reason.TYPE_MISMATCH, detail, original)
        if ts > received_at + MAX_FUTURE_SKEW_MS:
            detail = f"ts is {(ts - received_at) / 1000:.0f} s ahead of the gateway's clock"
            return reject(device_id, Reason.CLOCK_SKEW, detail, original)
        if ts < received_at - self._max_age_ms:
            detail = f"ts is {(received_at - ts) / 1000:.0f} s old, over the maximum age"
            return reject(device_id, Reason.CLOCK_SKEW, detail, original)
        if not self._limiter.allow(device_id, self._clock()):
            detail = f"over {self._limiter.rate:g} readings/s (burst {self._limiter.burst:g})"
            return reject(device_id, Reason.RATE_LIMITED, detail, original)
        # Metrics keep the schema's types (a JSON 21 for a float field is 21.0, so InfluxDB
        # sees floats); a metric sent as null is left out.
        metrics = cast(dict[str, Any], reading["metrics"])
        if None in metrics.values():
            metrics = {k: v for k, v in metrics.items() if v is not None}
        record: CanonicalReading = {
            "device_id": device_id,
            "type": kind,
            "ts": ts,
            "seq": reading.get("seq"),
            "metrics": metrics,
            "received_at": received_at,
        }
        return Accepted(device_id, to_json(record), ts)


# The longest topic with a valid device id (64 characters); longer ones are refused
# before the cache, so what it holds is bounded in bytes whatever devices send.
_LONGEST_TOPIC = len(telemetry_topic("x" * 64))


def _valid_device_id(topic: str) -> str | None:
    """The device id of `devices/{device_id}/telemetry` if it is a valid one."""
    return _checked_device_id(topic) if len(topic) <= _LONGEST_TOPIC else None


# A fleet's topics repeat: each is checked once (one per device, up to this many).
@functools.lru_cache(maxsize=100_000)
def _checked_device_id(topic: str) -> str | None:
    device_id = telemetry_device_id(topic)
    return device_id if device_id is not None and is_device_id(device_id) else None


def _compact(item: Any) -> bytes:
    """A batch element's bytes for its dead letter (the batch has no per-element bytes)."""
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
