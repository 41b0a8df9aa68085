"""From an MQTT message to readings for Kafka or dead letters with a reason (pure logic)."""

from __future__ import annotations

import functools
import json
import re
import time
import zoneinfo
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from gateway.domain.deadletters import DETAIL_MAX, Reason
from gateway.domain.pending import PendingBook
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.records import AvailabilityRecord, CanonicalReading
from gateway.domain.sources import Adapter, SourceError, SourceReading, Sources, infer_type
from gateway.domain.sources.base import AvailabilityAdapter, presence_word
from gateway.topics import status_device_id, telemetry_device_id, telemetry_topic
from schemas import Device, is_device_id
from schemas.reading import MAX_PAYLOAD_BYTES
from schemas.types import BUILTIN_CATALOGUE, TypeCatalogue

__all__ = [
    "ENVELOPE",
    "READING_SCHEMA",
    "Accepted",
    "Held",
    "Outcome",
    "Presence",
    "ReadingValidator",
    "Rejected",
]

READING_SCHEMA = b"reading/v1"
# Readings further ahead of the bridge's clock than this are rejected (DESIGN.md).
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000
# The source name of our own envelope in the metrics by source.
ENVELOPE = "envelope"
# Ignored field names counted per source (devices choose them; past this, "(other)").
_IGNORED_NAMES_MAX = 200
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_.:/-]{1,80}$")
# Devices whose inferred type and last gateway time are kept (a fleet; past it, forgotten).
_DEVICES_REMEMBERED = 100_000


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid reading: canonical JSON for `iot.readings`, keyed by device."""

    device_id: str
    value: bytes
    ts: int
    device_time: bool = True  # False: the device sent no time, `ts` is the bridge's


@dataclass(frozen=True, slots=True)
class Rejected:
    """A dead letter: the original bytes and why they were refused."""

    device_id: str | None
    reason: Reason
    detail: str
    original: bytes
    mqtt_topic: str
    received_at: int


@dataclass(frozen=True, slots=True)
class Presence:
    """A device's availability: a record of `iot.availability`, keyed by device."""

    device_id: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Held:
    """A message of a device awaiting approval: kept as it came in `iot.readings.pending`."""

    device_id: str
    original: bytes
    mqtt_topic: str
    received_at: int
    source: str  # the device source's name, or ENVELOPE
    kind: str | None  # the type it looks like, if it tells


Outcome = Accepted | Rejected | Presence | Held


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
    a batch is judged on its own, so the valid ones pass. Messages of the device sources
    (`sources`) are read by their adapter, then judged the same way against the device's
    type; what it counts by source is in `by_source` and `ignored` until taken
    (`take_counts`).
    """

    def __init__(
        self,
        lookup: Callable[[str], Device | None],
        *,
        require_registration: bool,
        max_age_ms: int,
        limiter: RateLimiter,
        clock: Callable[[], float] = time.monotonic,
        sources: Sources | None = None,
        catalogue: TypeCatalogue = BUILTIN_CATALOGUE,
        default_tz: str = "UTC",
        pending: PendingBook | None = None,
        unknown_devices: str = "reject",
        pending_max_devices: int = 10_000,
    ) -> None:
        self._lookup = lookup
        self._require_registration = require_registration
        self._max_age_ms = max_age_ms
        self._limiter = limiter
        self._clock = clock
        self.sources = sources or Sources()
        self.catalogue = catalogue
        self._reading = catalogue.reading
        self._default_tz = default_tz
        self.by_source: Counter[str] = Counter()
        self.ignored: Counter[tuple[str, str]] = Counter()
        self.presence_ignored: Counter[str] = Counter()
        self._ignored_names: dict[str, set[str]] = {}
        self._inferred: dict[str, str] = {}
        self._last_gateway_ts: dict[str, int] = {}
        # Pending devices (`pending`, None: none are held): the sources whose unknown devices
        # are held, how many devices at most; a replay of held messages is judged once more
        # (`replaying`), without holding or rate-limiting them again.
        self.pending = pending
        self._holding = self.sources.holding(unknown_devices) | (
            {ENVELOPE} if unknown_devices == "hold" else set()
        )
        self._pending_max_devices = pending_max_devices
        self._replaying = False
        self._envelope_holds = pending is not None and ENVELOPE in self._holding
        self._pending_devices = pending.devices if pending is not None else {}

    def replay(self, topic: str, payload: bytes, received_at: int) -> list[Outcome]:
        """The outcomes of a held message, its device approved: judged as if it came now,
        except that it is neither held again nor rate-limited (it was, when it came)."""
        self._replaying = True
        try:
            return self.process(topic, payload, received_at)
        finally:
            self._replaying = False

    def process(
        self, topic: str, payload: bytes, received_at: int, size: int | None = None
    ) -> list[Outcome]:
        """The outcome of each reading of one message. `size` is the payload's size when
        `payload` holds only its first bytes (a message too large to keep whole)."""

        def reject(device_id: str | None, reason: Reason, detail: str, original: bytes) -> Rejected:
            return Rejected(device_id, reason, detail[:DETAIL_MAX], original, topic, received_at)

        device_id = _valid_device_id(topic)
        if device_id is None and (status := status_device_id(topic)) is not None:
            return self._presence(ENVELOPE, status, topic, payload, received_at, reject)
        if device_id is None and self.sources:
            presence = self.sources.presence_route(topic)
            if presence is not None:
                announcer, source_device = presence
                return self._presence(announcer, source_device, topic, payload, received_at, reject)
            route = self.sources.route(topic)
            if route is not None:
                adapter, source_device = route
                return self._process_source(
                    adapter, source_device, topic, payload, received_at, size, reject
                )
            if self.sources.claims(topic):
                return []  # a source's topic that is no device's reading (bridge state, ...)
        if device_id is None:
            detail = f"topic {topic[:100]!r} is not devices/<device_id>/telemetry with a valid id"
            if self.sources:
                # E.g. the state topic of a Home Assistant entity removed a moment ago.
                detail += " nor a topic a device source reads"
            return [reject(None, Reason.UNKNOWN_DEVICE, detail, payload[:MAX_PAYLOAD_BYTES])]
        if (too_large := _too_large(payload, size)) is not None:
            return [reject(device_id, Reason.TOO_LARGE, too_large, payload[:MAX_PAYLOAD_BYTES])]
        # Inline, not a call: every envelope message passes here.
        if (self._envelope_holds or device_id in self._pending_devices) and not self._replaying:
            held = self._hold(ENVELOPE, None, device_id, topic, payload, received_at, reject)
            if held is not None:
                return [held]
        if payload.lstrip()[:1] == b"{":
            # One reading, the common case: parsed and validated in one pass, in Rust.
            try:
                reading = self._reading.validate_json(payload)
            except ValidationError as exc:
                first = exc.errors(include_url=False, include_input=False)[0]
                if first["type"] == "json_invalid":
                    detail = f"not JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
                    return [reject(device_id, Reason.MALFORMED, detail, payload)]
                return [reject(device_id, Reason.SCHEMA, _first_error(exc), payload)]
            self.by_source[ENVELOPE] += 1
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
        self.by_source[ENVELOPE] += len(document)
        outcomes: list[Outcome] = []
        for item in document:
            original = _compact(item)
            try:
                reading = self._reading.validate_python(item)
            except ValidationError as exc:
                outcomes.append(reject(device_id, Reason.SCHEMA, _first_error(exc), original))
                continue
            outcomes.append(self._check(device_id, reading, original, received_at, reject))
        return outcomes

    def _presence(
        self,
        source: AvailabilityAdapter | str,
        device_id: str,
        topic: str,
        payload: bytes,
        received_at: int,
        reject: Callable[[str | None, Reason, str, bytes], Rejected],
    ) -> list[Outcome]:
        """An availability message (our `devices/{id}/status` when `source` is ENVELOPE): a
        record for `iot.availability` if its device is registered and enabled, or awaits
        approval; a dead letter if it says neither online nor offline. Other devices' are
        counted in `presence_ignored` and left: brokers keep availability messages
        (retained) long after a device is gone, and hand them to every new subscription."""
        original = payload[:MAX_PAYLOAD_BYTES]
        if not is_device_id(device_id):
            self.presence_ignored["invalid_id"] += 1
            return []
        if len(payload) > MAX_PAYLOAD_BYTES:
            return [reject(device_id, Reason.TOO_LARGE, _too_large(payload, None) or "", original)]
        try:
            if isinstance(source, str):
                name = source
                online = presence_word(payload, b"online", b"offline", "a device status")
            else:
                name = source.name
                online = source.presence(payload)
        except SourceError as exc:
            return [reject(device_id, exc.reason, exc.detail, payload)]
        device = self._lookup(device_id)
        if device is None and self._require_registration:
            if self.pending is None or device_id not in self.pending.devices:
                self.presence_ignored[Reason.UNKNOWN_DEVICE.value] += 1
                return []
        elif device is not None and not device.enabled:
            self.presence_ignored[Reason.DEVICE_DISABLED.value] += 1
            return []
        if not self._limiter.allow(device_id, self._clock()):
            detail = f"over {self._limiter.rate:g} messages/s (burst {self._limiter.burst:g})"
            return [reject(device_id, Reason.RATE_LIMITED, detail, payload)]
        record: AvailabilityRecord = {
            "device_id": device_id,
            "online": online,
            "ts": received_at,
            "source": name,
        }
        return [Presence(device_id, to_json(record))]

    def _may_hold(self, source: str, device_id: str) -> bool:
        """Whether a message might be held (cheap: most are not, and go on at once)."""
        pending = self.pending
        return (
            pending is not None
            and not self._replaying
            and (source in self._holding or device_id in pending.devices)
        )

    def _hold(
        self,
        source: str,
        adapter: Adapter | None,
        device_id: str,
        topic: str,
        payload: bytes,
        received_at: int,
        reject: Callable[[str | None, Reason, str, bytes], Rejected],
    ) -> Held | Rejected | None:
        """A message to hold, as its device awaits approval (or a dead letter when no more
        devices may wait); None if it is judged as usual. A device with held messages has
        every later one held too, registered meanwhile or not, until its held ones are
        replayed: so they reach `iot.readings` before it, in its order."""
        pending = self.pending
        assert pending is not None
        if device_id not in pending:
            if (
                source not in self._holding
                or not self._require_registration
                or not is_device_id(device_id)
                or self._lookup(device_id) is not None
            ):
                return None
            if len(pending) >= self._pending_max_devices:
                detail = (
                    f"device {device_id} is not registered and {len(pending)} devices already "
                    "await approval (IOTGW_PENDING_MAX_DEVICES)"
                )
                return reject(device_id, Reason.UNKNOWN_DEVICE, detail, payload)
        if not self._limiter.allow(device_id, self._clock()):
            detail = f"over {self._limiter.rate:g} readings/s (burst {self._limiter.burst:g})"
            return reject(device_id, Reason.RATE_LIMITED, detail, payload)
        kind = self._held_type(adapter, device_id, topic, payload)
        pending.note_held(device_id, received_at, source, kind)
        return Held(device_id, payload, topic, received_at, source, kind)

    def _held_type(
        self, adapter: Adapter | None, device_id: str, topic: str, payload: bytes
    ) -> str | None:
        """The type a held message tells (an envelope's `type`, a source's inferred one)."""
        if adapter is None:
            try:
                document = from_json(payload, allow_inf_nan=False)
            except ValueError:
                return None
            first = document[0] if isinstance(document, list) and document else document
            kind = first.get("type") if isinstance(first, dict) else None
            return kind if isinstance(kind, str) and self.catalogue.get(kind) is not None else None
        known = self._inferred.get(device_id)
        if known is not None:
            return known
        try:
            readings = adapter.decode(topic, payload)
        except (SourceError, ArithmeticError, ValueError):
            return None
        for found in readings:
            if found.device_id == device_id:
                return self._inferred_type(adapter, found)
        return None

    def take_counts(
        self,
    ) -> tuple[dict[str, int], dict[tuple[str, str], int], dict[str, int]]:
        """Readings by source, ignored fields by (source, field) and ignored availability
        messages by reason since last taken."""
        counts = dict(self.by_source), dict(self.ignored), dict(self.presence_ignored)
        self.by_source.clear()
        self.ignored.clear()
        self.presence_ignored.clear()
        return counts

    def _process_source(
        self,
        adapter: Adapter,
        device_id: str,
        topic: str,
        payload: bytes,
        received_at: int,
        size: int | None,
        reject: Callable[[str | None, Reason, str, bytes], Rejected],
    ) -> list[Outcome]:
        """A device source's message (about `device_id`, as the route found): read by its
        adapter, each reading filtered to its device's type, validated, then checked like
        an envelope reading."""
        if (too_large := _too_large(payload, size)) is not None:
            return [reject(device_id, Reason.TOO_LARGE, too_large, payload[:MAX_PAYLOAD_BYTES])]
        if self._may_hold(adapter.name, device_id):
            held = self._hold(adapter.name, adapter, device_id, topic, payload, received_at, reject)
            if held is not None:
                return [held]
        try:
            readings = adapter.decode(topic, payload)
        except SourceError as exc:
            self.by_source[adapter.name] += 1
            return [reject(device_id, exc.reason, exc.detail, payload)]
        except (ArithmeticError, ValueError) as exc:
            # A number no unit conversion or time can take (1e400 °F, say).
            self.by_source[adapter.name] += 1
            detail = f"a value out of any range ({type(exc).__name__})"
            return [reject(device_id, Reason.SCHEMA, detail, payload)]
        outcomes: list[Outcome] = []
        for found in readings:
            self.by_source[adapter.name] += 1
            outcome = self._source_reading(adapter, found, payload, received_at, reject)
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _source_reading(
        self,
        adapter: Adapter,
        found: SourceReading,
        payload: bytes,
        received_at: int,
        reject: Callable[[str | None, Reason, str, bytes], Rejected],
    ) -> Outcome | None:
        """One device's reading of a source message; None when it holds nothing to ingest."""
        device_id = found.device_id
        for name in found.ignored:
            self._ignore(adapter.name, name)
        measured = {k: v for k, v in found.metrics.items() if v is not None}
        if not is_device_id(device_id):
            detail = f"{adapter.name} id {device_id!r} is not a valid device id"
            return reject(None, Reason.UNKNOWN_DEVICE, detail, payload)
        device = self._lookup(device_id)
        if device is not None and not device.enabled:
            detail = f"device {device_id} is disabled"
            return reject(device_id, Reason.DEVICE_DISABLED, detail, payload)
        if device is None and self._require_registration:
            detail = f"device {device_id} is not registered"
            return reject(device_id, Reason.UNKNOWN_DEVICE, detail, payload)
        if not measured:
            return None  # only fields we do not read (link quality, ...), or nulls
        kind = device.type if device is not None else self._inferred_type(adapter, found)
        if kind is None:
            detail = (
                f"cannot tell the type of {device_id} from "
                f"{', '.join(sorted(measured))}; register it"
            )
            return reject(device_id, Reason.SCHEMA, detail, payload)
        spec = self.catalogue.get(kind)
        if spec is None:
            return reject(device_id, Reason.SCHEMA, f"device type {kind} is not defined", payload)
        metrics: dict[str, Any] = {}
        for metric, value in measured.items():
            if metric in spec.metric_names:
                metrics[metric] = value
            else:
                self._ignore(adapter.name, found.origin.get(metric, metric))
        if not metrics:
            return None  # nothing of its type in this message (a battery sensor's voltage)
        try:
            metrics = self.catalogue.metrics_adapter(spec.name).validate_python(metrics)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            metric = str(error["loc"][0]) if error["loc"] else "metrics"
            source = found.origin.get(metric)
            where = f"{metric} (from {source})" if source and source != metric else metric
            detail = f"{where}: {error['msg'].removeprefix('Value error, ')}"
            return reject(device_id, Reason.SCHEMA, detail, payload)
        if found.ts is not None:
            tz = (device.tz if device is not None else None) or self._default_tz
            ts, device_time = _epoch_ms(found.ts, tz, received_at), True
        else:
            ts, device_time = self._gateway_time(device_id, received_at), False
        return self._judge(
            device_id, kind, ts, None, metrics, payload, received_at, reject,
            device_time=device_time,
        )  # fmt: skip

    def _inferred_type(self, adapter: Adapter, found: SourceReading) -> str | None:
        """An unregistered device's type: Home Assistant's device classes, else the first
        message that tells (then kept: a device is one measurement, whatever it sends)."""
        device_id = found.device_id
        known = self._inferred.get(device_id)
        if known is not None:
            return known
        homeassistant = self.sources.homeassistant
        kind = (
            homeassistant.inferred_type(device_id) if adapter is homeassistant else None
        ) or infer_type(found.metrics)
        if kind is not None:
            if len(self._inferred) >= _DEVICES_REMEMBERED:
                self._inferred.clear()
            self._inferred[device_id] = kind
        return kind

    def _gateway_time(self, device_id: str, received_at: int) -> int:
        """The receive time of a reading without a device time, a millisecond after the
        device's last one at least: a backlog received in one go keeps one point each."""
        ts = max(received_at, self._last_gateway_ts.get(device_id, 0) + 1)
        if len(self._last_gateway_ts) >= _DEVICES_REMEMBERED:
            self._last_gateway_ts.clear()
        self._last_gateway_ts[device_id] = ts
        return ts

    def _ignore(self, source: str, name: str) -> None:
        names = self._ignored_names.setdefault(source, set())
        if name not in names:
            if len(names) >= _IGNORED_NAMES_MAX or not _FIELD_NAME.fullmatch(name):
                name = "(other)"
            else:
                names.add(name)
        self.ignored[(source, name)] += 1

    def _check(
        self,
        device_id: str,
        reading: dict[str, Any],
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
        metrics = cast(dict[str, Any], reading["metrics"])
        return self._judge(
            device_id, kind, ts, reading.get("seq"), metrics, original, received_at, reject
        )

    def _judge(
        self,
        device_id: str,
        kind: str,
        ts: int,
        seq: int | None,
        metrics: dict[str, Any],
        original: bytes,
        received_at: int,
        reject: Callable[[str | None, Reason, str, bytes], Rejected],
        *,
        device_time: bool = True,
    ) -> Outcome:
        """The checks every valid reading passes last: its clock, the device's rate."""
        if ts > received_at + MAX_FUTURE_SKEW_MS:
            detail = f"ts is {(ts - received_at) / 1000:.0f} s ahead of the gateway's clock"
            return reject(device_id, Reason.CLOCK_SKEW, detail, original)
        if ts < received_at - self._max_age_ms:
            detail = f"ts is {(received_at - ts) / 1000:.0f} s old, over the maximum age"
            return reject(device_id, Reason.CLOCK_SKEW, detail, original)
        if not self._replaying and not self._limiter.allow(device_id, self._clock()):
            detail = f"over {self._limiter.rate:g} readings/s (burst {self._limiter.burst:g})"
            return reject(device_id, Reason.RATE_LIMITED, detail, original)
        # Metrics keep the schema's types (a JSON 21 for a float field is 21.0, so InfluxDB
        # sees floats); a metric sent as null is left out.
        if None in metrics.values():
            metrics = {k: v for k, v in metrics.items() if v is not None}
        record: CanonicalReading = {
            "device_id": device_id,
            "type": kind,
            "ts": ts,
            "seq": seq,
            "metrics": metrics,
            "received_at": received_at,
        }
        return Accepted(device_id, to_json(record), ts, device_time)


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


def _too_large(payload: bytes, size: int | None) -> str | None:
    """Why a payload is too large (`size` is its real size when `payload` holds only its
    first bytes); None if it is not."""
    size = len(payload) if size is None else size
    if size <= MAX_PAYLOAD_BYTES:
        return None
    limit = MAX_PAYLOAD_BYTES
    return f"payload of {size} bytes exceeds {limit}; its first {limit} bytes are kept"


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # A zone another host's tzdata had (the registry is shared): read as UTC.
        return zoneinfo.ZoneInfo("UTC")


def _epoch_ms(ts: int | datetime, tz: str, received_at: int) -> int:
    """A device time in epoch ms; a local time without an offset is read in `tz`, and of
    the two instants a clock change gives one local time, the nearer to `received_at`."""
    if isinstance(ts, int):
        return ts
    if ts.tzinfo is not None:
        return int(ts.timestamp() * 1000)
    zone = _zone(tz)
    instants = {int(ts.replace(tzinfo=zone, fold=fold).timestamp() * 1000) for fold in (0, 1)}
    return min(instants, key=lambda ms: abs(ms - received_at))


def _compact(item: Any) -> bytes:
    """A batch element's bytes for its dead letter (the batch has no per-element bytes)."""
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()
