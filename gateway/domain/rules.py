"""Rule evaluation: readings in event-time order, alerts out on every transition (pure logic)."""

from __future__ import annotations

import heapq
import itertools
import operator
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gateway.domain.records import CanonicalReading, MetricValue
from schemas import Device
from schemas.rules import AbsenceRule, RateRule, Rule, StateRule, ThresholdRule

__all__ = ["Alert", "RuleEngine", "RuleState"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
Key = tuple[str, str]  # (rule id, device id)


@dataclass(frozen=True)
class Alert:
    """A transition of a rule for a device: a record of `iot.alerts` (DESIGN.md)."""

    rule: str
    device_id: str
    state: Literal["firing", "resolved"]
    value: MetricValue | None
    ts: int
    message: str

    def record(self) -> dict[str, Any]:
        """The alert as its `iot.alerts` record."""
        return asdict(self)


@dataclass
class RuleState:
    """What a rule remembers about a device; persisted so a restart neither repeats nor
    misses a transition."""

    firing: bool = False
    since: int | None = None  # event time the condition started to hold (for `for`)
    last_ts: int | None = None  # newest reading's event time (absence)
    points: list[list[float]] = field(default_factory=list)  # [ts, value] in the window (rate)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuleState:
        return cls(**data)


@dataclass(order=True)
class _Buffered:
    ts: int
    order: int
    arrived_ms: int = field(compare=False)
    reading: CanonicalReading = field(compare=False)


class _ReorderBuffer:
    """Holds a device's readings until `grace` has passed, then releases them by event time.

    A reading is released once a reading `grace` newer has arrived, or once it waited
    `grace` on the wall clock. One older than what was already released is late.
    """

    def __init__(self, grace_ms: int) -> None:
        self.grace_ms = grace_ms
        self.heap: list[_Buffered] = []
        self.newest = 0
        self.released = -1

    def offer(
        self, reading: CanonicalReading, order: int, now_ms: int
    ) -> list[CanonicalReading] | None:
        ts = int(reading["ts"])
        if ts <= self.released:
            return None
        heapq.heappush(self.heap, _Buffered(ts, order, now_ms, reading))
        self.newest = max(self.newest, ts)
        return self.release(now_ms)

    def release(self, now_ms: int) -> list[CanonicalReading]:
        out = []
        while self.heap and (
            self.heap[0].ts <= self.newest - self.grace_ms
            or self.heap[0].arrived_ms <= now_ms - self.grace_ms
        ):
            item = heapq.heappop(self.heap)
            self.released = item.ts
            out.append(item.reading)
        return out


class RuleEngine:
    """Evaluates rules per device; `evaluate` for readings, `tick` for the wall clock.

    Keys of states that changed are collected in `changed`, for the caller to persist.
    """

    def __init__(
        self,
        rules: Iterable[Rule],
        lookup: Callable[[str], Device | None],
        *,
        grace_ms: int,
        devices: Callable[[], Iterable[Device]] = tuple,
        started_ms: int = 0,
    ) -> None:
        self.rules = list(rules)
        self.lookup = lookup
        self.devices = devices
        self.grace_ms = grace_ms
        self.started_ms = started_ms
        self.states: dict[Key, RuleState] = {}
        self.changed: set[Key] = set()
        self.late = 0
        self._buffers: dict[str, _ReorderBuffer] = {}
        self._order = itertools.count()
        self._by_type: dict[str, list[Rule]] = {}
        for rule in self.rules:
            for device_type in rule.device_types or []:
                self._by_type.setdefault(device_type.value, []).append(rule)
        self._any_type = [rule for rule in self.rules if not rule.device_types]
        self._rules_for: dict[str, list[Rule]] = {}

    def evaluate(self, reading: CanonicalReading, now_ms: int) -> list[Alert]:
        """Take a canonical reading; alerts of the readings the reorder buffer releases."""
        buffer = self._buffers.get(reading["device_id"])
        if buffer is None:
            buffer = self._buffers[reading["device_id"]] = _ReorderBuffer(self.grace_ms)
        released = buffer.offer(reading, next(self._order), now_ms)
        if released is None:
            self.late += 1
            return []
        return [alert for r in released for alert in self._apply(r)]

    def tick(self, now_ms: int) -> list[Alert]:
        """Release readings that waited out the grace, then check absence on the wall clock."""
        alerts = [
            alert
            for buffer in self._buffers.values()
            for reading in buffer.release(now_ms)
            for alert in self._apply(reading)
        ]
        absence = [r for r in self.rules if isinstance(r, AbsenceRule)]
        if absence:
            for device in self.devices():
                for rule in absence:
                    if self._in_scope(rule, device.device_id, device.type.value, device):
                        alerts.extend(self._absence_tick(rule, device.device_id, now_ms))
        return alerts

    def _in_scope(
        self, rule: Rule, device_id: str, device_type: str, device: Device | None
    ) -> bool:
        if rule.device_types and device_type not in rule.device_types:
            return False
        if rule.devices and device_id not in rule.devices:
            return False
        if rule.site and (device is None or device.site != rule.site):
            return False
        return not (rule.room and (device is None or device.room != rule.room))

    def _state(self, key: Key) -> RuleState:
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = RuleState()
        return state

    def _apply(self, reading: CanonicalReading) -> list[Alert]:
        device_id, device_type = reading["device_id"], reading["type"]
        rules = self._rules_for.get(device_type)
        if rules is None:
            rules = self._rules_for[device_type] = (
                self._by_type.get(device_type, []) + self._any_type
            )
        if not rules:
            return []
        device = self.lookup(device_id)
        alerts: list[Alert] = []
        for rule in rules:
            if (rule.devices or rule.site or rule.room) and not self._in_scope(
                rule, device_id, device_type, device
            ):
                continue
            key = (rule.id, device_id)
            if isinstance(rule, ThresholdRule | StateRule):
                value = reading["metrics"].get(rule.metric)
                if value is not None:
                    alerts.extend(self._held(rule, key, value, reading["ts"]))
            elif isinstance(rule, RateRule):
                value = reading["metrics"].get(rule.metric)
                if value is not None:
                    alerts.extend(self._rate(rule, key, float(value), reading["ts"]))
            else:
                alerts.extend(self._seen(rule, key, reading["ts"]))
        return alerts

    def _held(self, rule: ThresholdRule | StateRule, key: Key, value: Any, ts: int) -> list[Alert]:
        state = self.states.get(key) or self._state(key)
        if isinstance(rule, ThresholdRule):
            holds = _OPS[rule.op](value, rule.value)
            if state.firing:
                if rule.clear is None:
                    cleared = not holds
                elif rule.op in (">", ">="):
                    cleared = value <= rule.clear
                else:
                    cleared = value >= rule.clear
        else:
            holds = value is rule.equals
            cleared = not holds
        if state.firing:
            if cleared:
                state.firing, state.since = False, None
                self.changed.add(key)
                message = f"{rule.metric} back to {_show(value)}"
                return [Alert(rule.id, key[1], "resolved", value, ts, message)]
            return []
        if not holds:
            if state.since is not None:
                state.since = None
                self.changed.add(key)
            return []
        if state.since is None:
            state.since = ts
            self.changed.add(key)
        if ts - state.since >= rule.for_ * 1000:
            held = (ts - state.since) / 1000
            state.firing, state.since = True, None
            self.changed.add(key)
            if isinstance(rule, ThresholdRule):
                what = f"{rule.metric} {value:g} {rule.op} {rule.value:g}"
            else:
                what = f"{rule.metric} is {str(rule.equals).lower()}"
            suffix = f" for {held:g} s" if rule.for_ else ""
            return [Alert(rule.id, key[1], "firing", value, ts, what + suffix)]
        return []

    def _rate(self, rule: RateRule, key: Key, value: float, ts: int) -> list[Alert]:
        state = self._state(key)
        window_ms = rule.window * 1000
        state.points = [p for p in state.points if p[0] >= ts - window_ms] + [[ts, value]]
        self.changed.add(key)
        first_ts, first_value = state.points[0]
        span_min = (ts - first_ts) / 60_000
        # A rate over less than a tenth of the window is noise, not a trend.
        if span_min * 60_000 < window_ms / 10:
            return []
        per_minute = (value - first_value) / span_min
        if abs(per_minute) > rule.per_minute and not state.firing:
            state.firing = True
            message = f"{rule.metric} changing {per_minute:+.2f}/min (limit {rule.per_minute:g})"
            return [Alert(rule.id, key[1], "firing", round(per_minute, 4), ts, message)]
        if abs(per_minute) <= rule.per_minute and state.firing:
            state.firing = False
            message = f"{rule.metric} changing {per_minute:+.2f}/min"
            return [Alert(rule.id, key[1], "resolved", round(per_minute, 4), ts, message)]
        return []

    def _seen(self, rule: AbsenceRule, key: Key, ts: int) -> list[Alert]:
        state = self._state(key)
        state.last_ts = max(state.last_ts or 0, ts)
        self.changed.add(key)
        if state.firing:
            state.firing = False
            return [Alert(rule.id, key[1], "resolved", None, ts, "reading again")]
        return []

    def _absence_tick(self, rule: AbsenceRule, device_id: str, now_ms: int) -> list[Alert]:
        key = (rule.id, device_id)
        state = self.states.get(key)
        if state is not None and state.firing:
            return []
        last = state.last_ts if state is not None and state.last_ts else self.started_ms
        silent = (now_ms - last) / 1000
        if silent <= rule.after:
            return []
        state = self._state(key)
        state.firing = True
        self.changed.add(key)
        return [
            Alert(
                rule.id,
                device_id,
                "firing",
                round(silent, 1),
                now_ms,
                f"no reading for {silent:.0f} s",
            )
        ]


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"
