"""Rule evaluation: readings in event-time order and availability records, alerts out on
every transition (pure logic)."""

from __future__ import annotations

import heapq
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from pydantic_core import from_json, to_json

from gateway.domain.records import AvailabilityRecord, CanonicalReading, MetricValue
from schemas import Device
from schemas.rules import AbsenceRule, OfflineRule, RateRule, Rule, StateRule, ThresholdRule

__all__ = ["Alert", "RuleEngine", "RuleState", "decode_availability", "decode_reading"]

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


@dataclass(slots=True)
class RuleState:
    """What a rule remembers about a device; persisted so a restart neither repeats nor
    misses a transition."""

    firing: bool = False
    # Event time the condition started to hold (for `for`); for `offline`, when the device
    # went offline, kept while firing.
    since: int | None = None
    last_ts: int | None = None  # newest reading's event time (absence)
    # (ts, value) in the window (rate). Tuples, not lists: the collector stops tracking a
    # tuple of numbers, and a rate rule keeps a window of them for every device.
    points: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuleState:
        points = [(int(ts), float(value)) for ts, value in data.get("points", ())]
        return cls(**{**data, "points": points})


def decode_reading(value: bytes) -> CanonicalReading:
    """A record of `iot.readings` as a canonical reading; ValueError if it is not one, so a
    bad record is skipped before it reaches the engine rather than failing a batch."""
    reading = from_json(value)
    if not (
        isinstance(reading, dict)
        and isinstance(reading.get("device_id"), str)
        and isinstance(reading.get("type"), str)
        and type(reading.get("ts")) is int
        and isinstance(metrics := reading.get("metrics"), dict)
    ):
        raise ValueError("not a canonical reading")
    for metric in metrics.values():
        if not isinstance(metric, (int, float)):  # bool is an int
            raise ValueError("not a canonical reading: a metric is not a number or a bool")
    return cast(CanonicalReading, reading)


def decode_availability(value: bytes) -> AvailabilityRecord:
    """A record of `iot.availability`; ValueError if it is not one (skipped, like a reading)."""
    record = from_json(value)
    if not (
        isinstance(record, dict)
        and isinstance(record.get("device_id"), str)
        and type(record.get("online")) is bool
        and type(record.get("ts")) is int
    ):
        raise ValueError("not an availability record")
    return cast(AvailabilityRecord, record)


# A compiled rule for one device: (key, metric value or None, event time) -> its alert.
_Check = Callable[[Key, Any, int], Alert | None]
# The rate rules of one metric and window for one device, in rule order: (key, limit) each.
_RateMembers = tuple[tuple[Key, float], ...]
# Compiled rate rules of one metric and window: (members, value, event time, alerts out).
_RateCheck = Callable[[_RateMembers, Any, int, list[Alert]], None]
# Buffered reading: (event time, arrival order, wall clock at arrival, reading).
_Buffered = tuple[int, int, int, CanonicalReading]


class _ReorderBuffer:
    """Holds a device's readings until `grace` has passed, then releases them by event time.

    A reading is released once a reading `grace` newer has arrived, or once it waited
    `grace` on the wall clock. One older than what was already released is late.
    """

    __slots__ = ("grace_ms", "heap", "newest", "released")

    def __init__(self, grace_ms: int) -> None:
        self.grace_ms = grace_ms
        self.heap: list[_Buffered] = []
        self.newest = 0
        self.released = -1

    def offer(
        self, reading: CanonicalReading, order: int, now_ms: int
    ) -> list[CanonicalReading] | None:
        ts = reading["ts"]
        if ts <= self.released:
            return None
        heapq.heappush(self.heap, (ts, order, now_ms, reading))
        if ts > self.newest:
            self.newest = ts
        return self.release(now_ms)

    def release(self, now_ms: int) -> list[CanonicalReading]:
        out = []
        heap = self.heap
        by_event = self.newest - self.grace_ms
        by_wall = now_ms - self.grace_ms
        while heap and (heap[0][0] <= by_event or heap[0][2] <= by_wall):
            item = heapq.heappop(heap)
            self.released = item[0]
            out.append(item[3])
        return out


@dataclass(frozen=True, slots=True)
class _Plan:
    """The rules in scope of one device, resolved once: the index the engine reads per
    reading. Valid while the registry holds the same record for the device (records are
    immutable: a change is a new one) and its readings carry the same type."""

    device: Device | None
    device_type: str
    checks: tuple[tuple[_Check, Key, str | None], ...]  # in rule order; metric None: absence
    rates: tuple[tuple[_RateCheck, _RateMembers, str], ...]  # by metric and window
    absence: tuple[tuple[AbsenceRule, Key], ...]
    offline: tuple[tuple[OfflineRule, Key], ...]


class RuleEngine:
    """Evaluates rules per device; `evaluate_batch` (or `evaluate`) for readings,
    `evaluate_availability` for availability records (`offline` rules), `tick` for the
    wall clock.

    Rules are compiled once into checks, and each device's checks (the rules in its scope,
    by type, id, site and room) are resolved on its first reading and again only when its
    registry record changes. Rate rules of one metric and window are evaluated together,
    and those of a device whose windows hold the same points share one list (each still
    has its own state and record). Keys of states that changed are collected in `changed`,
    for the caller to persist (`records`) and to give back after a restart (`restore`).
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
        # Rules with a device type before those for any type, as they always were.
        ordered = sorted(self.rules, key=lambda rule: not rule.device_types)
        self._compiled = [
            (rule, self._compile(rule))
            for rule in ordered
            if not isinstance(rule, RateRule | OfflineRule)
        ]
        self._offline = [rule for rule in ordered if isinstance(rule, OfflineRule)]
        self._offline_by_id = {rule.id: rule for rule in self._offline}
        # Devices offline and not yet for their rule's `for`: the wall clock fires them.
        self._waiting: dict[Key, OfflineRule] = {}
        rate_groups: dict[tuple[str, float], list[RateRule]] = {}
        for rule in ordered:
            if isinstance(rule, RateRule):
                rate_groups.setdefault((rule.metric, rule.window), []).append(rule)
        self._rate_groups = [
            (group, self._rate(metric, window * 1000))
            for (metric, window), group in rate_groups.items()
        ]
        self._plans: dict[str, _Plan] = {}

    def evaluate(self, reading: CanonicalReading, now_ms: int) -> list[Alert]:
        """Take a canonical reading; alerts of the readings the reorder buffer releases."""
        return self.evaluate_batch((reading,), now_ms)

    def evaluate_batch(self, readings: Iterable[CanonicalReading], now_ms: int) -> list[Alert]:
        """Take canonical readings in arrival order; the alerts of those released."""
        alerts: list[Alert] = []
        buffers, order, grace_ms = self._buffers, self._order, self.grace_ms
        for reading in readings:
            device_id = reading["device_id"]
            buffer = buffers.get(device_id)
            if buffer is None:
                buffer = buffers[device_id] = _ReorderBuffer(grace_ms)
            released = buffer.offer(reading, next(order), now_ms)
            if released is None:
                self.late += 1
                continue
            for ready in released:
                self._apply(ready, alerts)
        return alerts

    def evaluate_availability(self, records: Iterable[AvailabilityRecord]) -> list[Alert]:
        """Take availability records, each device's in the order the bridge received them;
        the alerts of the `offline` rules in scope of their devices."""
        alerts: list[Alert] = []
        if not self._offline:
            return alerts
        for record in records:
            device_id = record["device_id"]
            device = self.lookup(device_id)
            # The record carries no type: the registry's, else the one of the device's readings.
            known = self._plans.get(device_id)
            device_type = (
                device.type if device is not None else (known.device_type if known else "")
            )
            for rule, key in self._plan(device_id, device_type, device).offline:
                self._availability(rule, key, record["online"], record["ts"], alerts)
        return alerts

    def restore(self, key: Key, state: RuleState | None) -> None:
        """Take back a state read from its record (None: removed) after a restart."""
        self._waiting.pop(key, None)
        rule = self._offline_by_id.get(key[0])
        # An offline device's state always has `since`; one without is a state of another
        # kind of rule that had this id before, meaningless now.
        if state is None or (rule is not None and state.since is None):
            self.states.pop(key, None)
            return
        self.states[key] = state
        if rule is not None and not state.firing:
            self._waiting[key] = rule

    def tick(self, now_ms: int, *, offline: bool = True) -> list[Alert]:
        """Release readings that waited out the grace, then check absence and (`offline`:
        the caller has read every availability record) offline devices on the wall clock."""
        alerts: list[Alert] = []
        for buffer in self._buffers.values():
            for reading in buffer.release(now_ms):
                self._apply(reading, alerts)
        if any(isinstance(rule, AbsenceRule) for rule in self.rules):
            for device in self.devices():
                plan = self._plan(device.device_id, device.type, device)
                for rule, key in plan.absence:
                    alert = self._absence_tick(rule, key, now_ms)
                    if alert is not None:
                        alerts.append(alert)
        for key, waiting in list(self._waiting.items()) if offline else ():
            state = self.states[key]
            assert state.since is not None
            if now_ms - state.since >= waiting.for_ * 1000:
                alerts.append(self._offline_firing(waiting, key, state))
        return alerts

    def records(self, keys: Iterable[Key]) -> Iterator[tuple[Key, bytes | None]]:
        """The JSON records of these states (None for one removed): `firing`, `since`,
        `last_ts` and `points`, with a window shared by several rules encoded once."""
        windows: dict[int, bytes] = {}  # id of a points list (alive meanwhile) -> its JSON
        for key in keys:
            state = self.states.get(key)
            if state is None:
                yield key, None
                continue
            points = windows.get(id(state.points))
            if points is None:
                points = windows[id(state.points)] = to_json(state.points)
            yield (
                key,
                b"".join(
                    (
                        b'{"firing":true,"since":' if state.firing else b'{"firing":false,"since":',
                        b"null" if state.since is None else b"%d" % state.since,
                        b',"last_ts":',
                        b"null" if state.last_ts is None else b"%d" % state.last_ts,
                        b',"points":',
                        points,
                        b"}",
                    )
                ),
            )

    def _plan(self, device_id: str, device_type: str, device: Device | None) -> _Plan:
        plan = self._plans.get(device_id)
        if plan is None or plan.device is not device or plan.device_type != device_type:
            in_scope = [
                (rule, check)
                for rule, check in self._compiled
                if _in_scope(rule, device_id, device_type, device)
            ]
            rates = []
            for group, check in self._rate_groups:
                for rule in group:
                    # A rule leaving (or joining) the scope stops (or starts) taking the
                    # readings its window-mates take: windows are shared again only once
                    # equal (see _rate).
                    state = self.states.get((rule.id, device_id))
                    if state is not None:
                        state.points = list(state.points)
                members = tuple(
                    ((rule.id, device_id), rule.per_minute)
                    for rule in group
                    if _in_scope(rule, device_id, device_type, device)
                )
                if members:
                    rates.append((check, members, group[0].metric))
            plan = self._plans[device_id] = _Plan(
                device,
                device_type,
                tuple(
                    (check, (rule.id, device_id), getattr(rule, "metric", None))
                    for rule, check in in_scope
                ),
                tuple(rates),
                tuple(
                    (rule, (rule.id, device_id))
                    for rule, _ in in_scope
                    if isinstance(rule, AbsenceRule)
                ),
                tuple(
                    (rule, (rule.id, device_id))
                    for rule in self._offline
                    if _in_scope(rule, device_id, device_type, device)
                ),
            )
        return plan

    def _apply(self, reading: CanonicalReading, alerts: list[Alert]) -> None:
        device_id = reading["device_id"]
        plan = self._plan(device_id, reading["type"], self.lookup(device_id))
        metrics, ts = reading["metrics"], reading["ts"]
        for check, key, metric in plan.checks:
            if metric is None:
                alert = check(key, None, ts)
            else:
                value = metrics.get(metric)
                if value is None:
                    continue
                alert = check(key, value, ts)
            if alert is not None:
                alerts.append(alert)
        for rate, members, metric in plan.rates:
            value = metrics.get(metric)
            if value is not None:
                rate(members, value, ts, alerts)

    def _compile(self, rule: Rule) -> _Check:
        if isinstance(rule, ThresholdRule):
            return self._threshold(rule)
        if isinstance(rule, StateRule):
            return self._state_check(rule)
        # Rate rules are compiled by metric and window; offline rules take no readings.
        assert isinstance(rule, AbsenceRule)
        return self._seen(rule)

    def _threshold(self, rule: ThresholdRule) -> _Check:
        holds_op, limit, clear, for_ms = _OPS[rule.op], rule.value, rule.clear, rule.for_ * 1000
        above = rule.op in (">", ">=")
        states, rule_id, metric = self.states, rule.id, rule.metric
        suffix = " for {:g} s" if rule.for_ else ""

        def check(key: Key, value: Any, ts: int) -> Alert | None:
            holds = holds_op(value, limit)
            state = states.get(key)
            if state is None:
                if not holds:
                    return None  # nothing to remember: no state until the condition holds
                state = states[key] = RuleState()
            if state.firing:
                if clear is None:
                    cleared = not holds
                elif above:
                    cleared = value <= clear
                else:
                    cleared = value >= clear
                return self._resolve(state, rule_id, metric, key, value, ts) if cleared else None
            held = self._held(state, key, holds, ts, for_ms)
            if held is None:
                return None
            what = f"{metric} {value:g} {rule.op} {limit:g}" + suffix.format(held)
            return Alert(rule_id, key[1], "firing", value, ts, what)

        return check

    def _state_check(self, rule: StateRule) -> _Check:
        equals, for_ms = rule.equals, rule.for_ * 1000
        states, rule_id, metric = self.states, rule.id, rule.metric
        suffix = " for {:g} s" if rule.for_ else ""

        def check(key: Key, value: Any, ts: int) -> Alert | None:
            holds = value is equals
            state = states.get(key)
            if state is None:
                if not holds:
                    return None
                state = states[key] = RuleState()
            if state.firing:
                return None if holds else self._resolve(state, rule_id, metric, key, value, ts)
            held = self._held(state, key, holds, ts, for_ms)
            if held is None:
                return None
            what = f"{metric} is {str(equals).lower()}" + suffix.format(held)
            return Alert(rule_id, key[1], "firing", value, ts, what)

        return check

    def _resolve(
        self, state: RuleState, rule_id: str, metric: str, key: Key, value: Any, ts: int
    ) -> Alert:
        state.firing, state.since = False, None
        self.changed.add(key)
        return Alert(rule_id, key[1], "resolved", value, ts, f"{metric} back to {_show(value)}")

    def _held(
        self, state: RuleState, key: Key, holds: bool, ts: int, for_ms: float
    ) -> float | None:
        """For a rule not firing: start or stop the `for` clock; the seconds the condition
        held when it fires now, else None."""
        if not holds:
            if state.since is not None:
                state.since = None
                self.changed.add(key)
            return None
        if state.since is None:
            state.since = ts
            self.changed.add(key)
        if ts - state.since < for_ms:
            return None
        held = (ts - state.since) / 1000
        state.firing, state.since = True, None
        self.changed.add(key)
        return held

    def _rate(self, metric: str, window_ms: float) -> _RateCheck:
        states, changed = self.states, self.changed

        def check(members: _RateMembers, number: Any, ts: int, alerts: list[Alert]) -> None:
            value = float(number)
            cutoff = ts - window_ms
            moved: list[list[tuple[int, float]]] = []  # windows that took this reading
            for key, limit in members:
                state = states.get(key)
                if state is None:
                    state = states[key] = RuleState()
                points = state.points
                for window in moved:
                    if window is points:
                        break
                else:
                    # Points are in event-time order (the reorder buffer's): the old ones lead.
                    drop = 0
                    while drop < len(points) and points[drop][0] < cutoff:
                        drop += 1
                    del points[:drop]
                    points.append((ts, value))
                    # Rules of one metric and window fed the same readings from equal
                    # windows keep equal ones: share the list, move it once a reading.
                    for window in moved:
                        if window == points:
                            state.points = points = window
                            break
                    else:
                        moved.append(points)
                changed.add(key)
                first_ts, first_value = points[0]
                span_min = (ts - first_ts) / 60_000
                # A rate over less than a tenth of the window is noise, not a trend.
                if span_min * 60_000 < window_ms / 10:
                    continue
                per_minute = (value - first_value) / span_min
                if abs(per_minute) > limit and not state.firing:
                    state.firing = True
                    message = f"{metric} changing {per_minute:+.2f}/min (limit {limit:g})"
                    alerts.append(
                        Alert(key[0], key[1], "firing", round(per_minute, 4), ts, message)
                    )
                elif abs(per_minute) <= limit and state.firing:
                    state.firing = False
                    message = f"{metric} changing {per_minute:+.2f}/min"
                    alerts.append(
                        Alert(key[0], key[1], "resolved", round(per_minute, 4), ts, message)
                    )

        return check

    def _seen(self, rule: AbsenceRule) -> _Check:
        states, rule_id = self.states, rule.id

        def check(key: Key, _: Any, ts: int) -> Alert | None:
            state = states.get(key)
            if state is None:
                state = states[key] = RuleState()
            state.last_ts = max(state.last_ts or 0, ts)
            self.changed.add(key)
            if state.firing:
                state.firing = False
                return Alert(rule_id, key[1], "resolved", None, ts, "reading again")
            return None

        return check

    def _absence_tick(self, rule: AbsenceRule, key: Key, now_ms: int) -> Alert | None:
        state = self.states.get(key)
        if state is not None and state.firing:
            return None
        last = state.last_ts if state is not None and state.last_ts else self.started_ms
        silent = (now_ms - last) / 1000
        if silent <= rule.after:
            return None
        if state is None:
            state = self.states[key] = RuleState()
        state.firing = True
        self.changed.add(key)
        return Alert(
            rule.id, key[1], "firing", round(silent, 1), now_ms, f"no reading for {silent:.0f} s"
        )

    def _availability(
        self, rule: OfflineRule, key: Key, online: bool, ts: int, alerts: list[Alert]
    ) -> None:
        """An offline device starts the rule's `for` (or fires at once without one); an
        online one resolves a firing alert. The state lives only while the device is offline."""
        state = self.states.get(key)
        if not online:
            if state is not None:
                return  # offline already (a repeated last will): since its first offline
            state = self.states[key] = RuleState(since=ts)
            self.changed.add(key)
            if rule.for_:
                self._waiting[key] = rule
            else:
                alerts.append(self._offline_firing(rule, key, state))
            return
        if state is None:
            return
        assert state.since is not None
        if not state.firing and ts - state.since >= rule.for_ * 1000:
            # Offline long enough, but no tick saw it (the engine was behind or down): the
            # transition happened, so it is reported before the one that ends it.
            alerts.append(self._offline_firing(rule, key, state))
        if state.firing:
            away = (ts - state.since) / 1000
            alerts.append(
                Alert(rule.id, key[1], "resolved", 1, ts, f"online again after {away:.0f} s")
            )
        del self.states[key]
        self._waiting.pop(key, None)
        self.changed.add(key)

    def _offline_firing(self, rule: OfflineRule, key: Key, state: RuleState) -> Alert:
        """Fire an offline rule whose device went offline at `state.since`; the alert's time
        is when the device had been offline for `for` (value 0: offline)."""
        assert state.since is not None
        state.firing = True
        self._waiting.pop(key, None)
        self.changed.add(key)
        message = f"offline for {rule.for_:g} s" if rule.for_ else "offline"
        return Alert(rule.id, key[1], "firing", 0, state.since + int(rule.for_ * 1000), message)


def _in_scope(rule: Rule, device_id: str, device_type: str, device: Device | None) -> bool:
    if rule.device_types and device_type not in rule.device_types:
        return False
    if rule.devices and device_id not in rule.devices:
        return False
    if rule.site and (device is None or device.site != rule.site):
        return False
    return not (rule.room and (device is None or device.room != rule.room))


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"
