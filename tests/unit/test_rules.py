"""Rule evaluation without servers: thresholds with `for` and hysteresis, state, rate,
absence, scopes, out-of-order readings, and rules files with located errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic_core import from_json, to_json

from gateway.domain.records import CanonicalReading
from gateway.domain.rules import Alert, RuleEngine, RuleState, decode_reading
from gateway.domain.rules_file import RulesFileError, load_rules
from schemas import Device, DeviceType
from schemas.rules import RulesFile
from schemas.types import BUILTIN_CATALOGUE

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_795_680_000_000
DEVICES = {
    "t1": Device(
        device_id="t1", type=DeviceType.THERMOSTAT, registered_at=0, site="home", room="kitchen"
    ),
    "t2": Device(device_id="t2", type=DeviceType.THERMOSTAT, registered_at=0, site="office"),
    "c1": Device(device_id="c1", type=DeviceType.CONTACT, registered_at=0),
}


def record_of(state: RuleState) -> dict[str, Any]:
    """A state's record in `iot.rules.state`, field by field: what records() must write."""
    return {
        "firing": state.firing,
        "since": state.since,
        "last_ts": state.last_ts,
        "points": state.points,
    }


def engine(*rules: dict[str, Any], grace_ms: int = 0) -> RuleEngine:
    parsed = RulesFile.model_validate({"rules": list(rules)}).rules
    return RuleEngine(
        parsed, DEVICES.get, grace_ms=grace_ms, devices=lambda: DEVICES.values(), started_ms=T0
    )


def reading(device_id: str, ts: int, **metrics: Any) -> CanonicalReading:
    device = DEVICES.get(device_id)
    device_type = device.type if device else "thermostat"
    return CanonicalReading(
        device_id=device_id, type=device_type, ts=ts, seq=0, metrics=metrics, received_at=ts
    )


def feed(
    rules: RuleEngine, device_id: str, series: list[tuple[int, Any]], metric: str
) -> list[Alert]:
    alerts: list[Alert] = []
    for offset_s, value in series:
        ts = T0 + offset_s * 1000
        alerts += rules.evaluate(reading(device_id, ts, **{metric: value}), ts)
    return alerts


TOO_WARM = {
    "id": "too-warm", "kind": "threshold", "device_types": ["thermostat"],
    "metric": "temperature_c", "op": ">", "value": 30, "for": "60s", "clear": 28,
}  # fmt: skip


def test_threshold_fires_after_holding_for_and_resolves_at_clear() -> None:
    """Firing once the value held past `for` (event time); resolved at the clear value."""
    alerts = feed(
        engine(TOO_WARM), "t1",
        [(0, 31), (30, 32), (59, 33), (61, 31), (90, 29), (120, 28), (150, 31)],
        "temperature_c",
    )  # fmt: skip
    assert [(a.state, a.ts, a.value) for a in alerts] == [
        ("firing", T0 + 61_000, 31),
        ("resolved", T0 + 120_000, 28),
    ]
    assert alerts[0].message == "temperature_c 31 > 30 for 61 s"


def test_a_dip_below_resets_the_for_clock() -> None:
    """`for` means held without a break: a reading under the threshold starts it again."""
    alerts = feed(
        engine(TOO_WARM),
        "t1",
        [(0, 31), (50, 29.5), (60, 31), (100, 31), (121, 31)],
        "temperature_c",
    )
    assert [(a.state, a.ts) for a in alerts] == [("firing", T0 + 121_000)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(28.01, 45), min_size=1, max_size=60))
def test_hysteresis_fires_once_while_above_clear(values: list[float]) -> None:
    """Oscillating around the threshold, never down to `clear`: at most one firing, no
    resolved."""
    rules = engine({**TOO_WARM, "for": "0s"})
    alerts = feed(rules, "t1", [(i * 10, v) for i, v in enumerate(values)], "temperature_c")
    assert [a.state for a in alerts] == (["firing"] if any(v > 30 for v in values) else [])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=40))
def test_firing_only_after_the_condition_held_for_its_duration(
    steps: list[tuple[int, bool]],
) -> None:
    """A firing always comes at a reading that ends an unbroken run of `for` seconds."""
    rules = engine(TOO_WARM)
    t, series = 0, []
    for gap, hot in steps:
        t += gap
        series.append((t, 35 if hot else 20))
    for alert in feed(rules, "t1", series, "temperature_c"):
        offset = (alert.ts - T0) // 1000
        if alert.state == "firing":
            run = [s for s in series if s[0] <= offset]
            start = offset
            for when, value in reversed(run):
                if value != 35:
                    break
                start = when
            assert offset - start >= 60


def test_state_rule_needs_the_value_for_its_duration() -> None:
    """A door open for 10 minutes fires once, and resolves when it closes."""
    rules = engine(
        {
            "id": "door",
            "kind": "state",
            "device_types": ["contact"],
            "metric": "open",
            "equals": True,
            "for": "10m",
        }
    )
    alerts = feed(
        rules, "c1", [(0, True), (300, True), (601, True), (700, True), (720, False)], "open"
    )
    assert [(a.state, a.ts, a.value) for a in alerts] == [
        ("firing", T0 + 601_000, True),
        ("resolved", T0 + 720_000, False),
    ]


def test_rate_rule_fires_on_a_fast_change_and_resolves_when_it_calms() -> None:
    """Temperature rising 3 °C/min fires at 2 °C/min; flat readings resolve it."""
    rules = engine(
        {
            "id": "rising",
            "kind": "rate",
            "device_types": ["thermostat"],
            "metric": "temperature_c",
            "per_minute": 2.0,
            "window": "60s",
        }
    )
    series = [(i * 10, 20 + 0.5 * i) for i in range(7)] + [(70 + i * 10, 23.0) for i in range(8)]
    alerts = feed(rules, "t1", series, "temperature_c")
    assert [a.state for a in alerts] == ["firing", "resolved"]
    assert alerts[0].value == pytest.approx(3.0)


def test_rate_state_restored_from_its_record_resumes_the_window() -> None:
    """An engine restarted from its states' JSON records mid-window alerts like one that ran on."""
    rule = {
        "id": "rising", "kind": "rate", "device_types": ["thermostat"],
        "metric": "temperature_c", "per_minute": 2.0, "window": "60s",
    }  # fmt: skip
    series = [(i * 10, 20 + 0.5 * i) for i in range(7)] + [(70 + i * 10, 23.0) for i in range(8)]
    whole = feed(engine(rule), "t1", series, "temperature_c")
    first = engine(rule)
    alerts = feed(first, "t1", series[:5], "temperature_c")
    restarted = engine(rule)
    restarted.states.update(
        (key, RuleState.from_dict(from_json(to_json(record_of(state)))))
        for key, state in first.states.items()
    )
    alerts += feed(restarted, "t1", series[5:], "temperature_c")
    assert alerts == whole
    assert [a.state for a in alerts] == ["firing", "resolved"]


def test_absence_fires_on_the_wall_clock_and_resolves_with_the_next_reading() -> None:
    """No reading for `after`: firing from tick(); the next reading resolves it."""
    rules = engine({"id": "silent", "kind": "absence", "device_types": ["contact"], "after": "5m"})
    assert rules.evaluate(reading("c1", T0, open=False), T0) == []
    assert rules.tick(T0 + 299_000) == []
    [firing] = rules.tick(T0 + 301_000)
    assert (firing.state, firing.device_id, firing.value) == ("firing", "c1", 301.0)
    assert rules.tick(T0 + 400_000) == []
    [resolved] = rules.evaluate(reading("c1", T0 + 401_000, open=False), T0 + 401_000)
    assert resolved.state == "resolved"


def test_scope_by_devices_site_and_room() -> None:
    """Only devices in scope are evaluated."""
    rules = engine(
        {**TOO_WARM, "id": "site", "for": "0s", "site": "office"},
        {**TOO_WARM, "id": "room", "for": "0s", "room": "kitchen"},
        {**TOO_WARM, "id": "list", "for": "0s", "devices": ["t2"]},
    )
    fired = {
        (a.rule, a.device_id)
        for d in ("t1", "t2")
        for a in feed(rules, d, [(0, 35)], "temperature_c")
    }
    assert fired == {("site", "t2"), ("room", "t1"), ("list", "t2")}


def test_readings_out_of_order_within_the_grace_give_no_false_alert() -> None:
    """A late-arriving older reading is put back in event-time order before evaluation."""
    rising = {"id": "rising", "kind": "rate", "device_types": ["thermostat"],
              "metric": "temperature_c", "per_minute": 2.0, "window": "60s"}  # fmt: skip
    rules = engine(rising, grace_ms=30_000)
    arrival = [(0, 20.0), (20, 20.2), (10, 20.1), (40, 20.4), (30, 20.3), (50, 20.5), (90, 20.9)]
    assert feed(rules, "t1", arrival, "temperature_c") == []
    assert rules.late == 0
    unbuffered = engine(rising, grace_ms=0)
    assert feed(unbuffered, "t1", arrival, "temperature_c") == []
    assert unbuffered.late == 2  # without a grace the older readings are dropped, not misread


def test_default_and_demo_rules_files_are_valid() -> None:
    """rules.yaml covers every device type and every rule kind."""
    rules = load_rules(ROOT / "rules.yaml").rules
    kinds = {"threshold", "absence", "rate", "state", "offline"}
    assert {r.kind for r in rules} == kinds
    covered = {t for r in rules for t in (r.device_types or list(DeviceType))}
    assert covered == set(DeviceType)
    demo = load_rules(ROOT / "simulators" / "demo-rules.yaml").rules
    assert {r.kind for r in demo} == kinds


def test_rules_file_errors_name_file_line_and_field(tmp_path: Path) -> None:
    """Every problem is reported, each with its line and its field."""
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - id: a\n"
        "    kind: threshold\n"
        "    metric: temperature_c\n"
        '    op: "=>"\n'
        "    value: 3\n"
        "    for: 5 minutes\n"
        "  - id: b\n"
        "    kind: state\n"
        "    metric: power_w\n"
        "    equals: true\n"
        "  - id: c\n"
        "    kind: threshold\n"
        "    device_types: [motion]\n"
        "    metric: temperature_c\n"
        '    op: ">"\n'
        "    value: 1\n"
    )
    with pytest.raises(RulesFileError) as caught:
        load_rules(path)
    assert caught.value.problems == [
        f"{path}:5: rules[0].op: Input should be '>', '>=', '<' or '<='",
        f"{path}:7: rules[0].for: a duration is a number and a unit: 500ms, 30s, 5m, 1h, 2d",
        f"{path}:8: rules[1]: metric 'power_w' is not an on/off metric",
        f"{path}:12: rules[2]: no device type in scope has a metric 'temperature_c'",
    ]
    assert caught.value.exit_code == 2


def test_hysteresis_clear_on_the_wrong_side_is_refused(tmp_path: Path) -> None:
    """`clear` above the value of a `>` rule could never resolve it."""
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n  - {id: a, kind: threshold, metric: co2_ppm, op: '>', value: 1000, clear: 1200}\n"
    )
    with pytest.raises(RulesFileError, match="clear must be at or below value"):
        load_rules(path)


def test_rules_in_scope_follow_registry_changes_of_site_room_and_type() -> None:
    """A device moved to another site, room or type is evaluated against the rules of its
    new scope from its next reading on, not those resolved for its old record."""
    registry = {"m": Device(device_id="m", type=DeviceType.THERMOSTAT, registered_at=0,
                            site="home", room="kitchen")}  # fmt: skip
    rules = RuleEngine(
        RulesFile.model_validate({"rules": [
            {**TOO_WARM, "id": "home", "for": "0s", "site": "home"},
            {**TOO_WARM, "id": "office", "for": "0s", "site": "office"},
            {**TOO_WARM, "id": "hall", "for": "0s", "room": "hall"},
            {"id": "plug", "kind": "threshold", "device_types": ["smart_plug"],
             "metric": "power_w", "op": ">", "value": 3000},
        ]}).rules,
        registry.get, grace_ms=0,
    )  # fmt: skip

    def fired(ts: int, device_type: str = "thermostat", **metrics: Any) -> set[str]:
        alerts = rules.evaluate(
            CanonicalReading(device_id="m", type=device_type, ts=ts, seq=0, metrics=metrics,
                             received_at=ts), ts,
        )  # fmt: skip
        return {a.rule for a in alerts if a.state == "firing"}

    assert fired(T0, temperature_c=35) == {"home"}
    registry["m"] = registry["m"].model_copy(update={"site": "office", "room": "hall"})
    assert fired(T0 + 1000, temperature_c=20) == set()  # "home" resolves, no longer in scope
    assert fired(T0 + 2000, temperature_c=35) == {"office", "hall"}
    registry["m"] = registry["m"].model_copy(update={"type": DeviceType.SMART_PLUG})
    assert fired(T0 + 3000, "smart_plug", power_w=3500.0) == {"plug"}


def test_indexed_engine_alerts_like_one_engine_per_rule_on_a_mixed_workload() -> None:
    """Many rules of every kind and scope over a mixed fleet whose registry changes midway:
    every rule and device gets the same alerts as an engine holding only that rule, fed
    only the readings in the rule's scope (decided here, without the engine's index)."""
    examples = load_rules(ROOT / "rules.yaml").rules
    scopes: list[dict[str, Any]] = [
        {},
        {"site": "home"},
        {"room": "kitchen"},
        {"devices": ["d1", "d4"]},
    ]
    rules = [
        rule.model_copy(update={"id": f"{rule.id}-{n}", **scope})
        for n, scope in enumerate(scopes)
        for rule in examples
    ]
    types = [DeviceType.THERMOSTAT, DeviceType.AIR_QUALITY, DeviceType.MOTION,
             DeviceType.CONTACT, DeviceType.SMART_PLUG]  # fmt: skip
    registry = {
        f"d{i}": Device(device_id=f"d{i}", type=types[i % 5], registered_at=0,
                        site=("home", "office")[i % 2], room=("kitchen", "hall", None)[i % 3])
        for i in range(10)
    }  # fmt: skip
    values: dict[str, list[float | bool]] = {
        "temperature_c": [10.0, 15.0, 26.0, 29.0, 31.0], "co2_ppm": [500.0, 1500.0],
        "pm2_5_ugm3": [5.0, 40.0], "battery_pct": [10.0, 50.0], "power_w": [100.0, 3500.0],
        "open": [True, False], "on": [True, False], "motion": [True, False],
    }  # fmt: skip
    workload: list[tuple[dict[str, Device], CanonicalReading]] = []
    for step in range(400):
        if step == 200:
            registry = dict(registry)
            registry["d0"] = registry["d0"].model_copy(update={"site": "office", "room": "hall"})
            registry["d3"] = registry["d3"].model_copy(update={"room": "kitchen"})
            registry["d5"] = registry["d5"].model_copy(update={"type": DeviceType.AIR_QUALITY})
        device = registry[f"d{step % 10}"]
        ts = T0 + step * 60_000 + (step % 7) * 1000
        metric_names = [m for m in values if m in BUILTIN_CATALOGUE.metric_names(device.type)]
        metrics = {
            m: values[m][(step * 7 + i) % len(values[m])] for i, m in enumerate(metric_names)
        }
        workload.append((registry, CanonicalReading(
            device_id=device.device_id, type=device.type, ts=ts, seq=step,
            metrics=metrics, received_at=ts,
        )))  # fmt: skip

    current: dict[str, dict[str, Device]] = {"registry": workload[0][0]}
    indexed = RuleEngine(rules, lambda d: current["registry"].get(d), grace_ms=120_000)
    got: list[Alert] = []
    for registry_now, read in workload:
        current["registry"] = registry_now
        got += indexed.evaluate(read, read["ts"])
    for rule in rules:
        alone = RuleEngine([rule.model_copy(update={"device_types": None, "devices": None,
                                                    "site": None, "room": None})],
                           lambda d: None, grace_ms=120_000)  # fmt: skip
        expected: list[Alert] = []
        for registry_now, read in workload:
            device = registry_now[read["device_id"]]
            if (
                (not rule.device_types or read["type"] in rule.device_types)
                and (not rule.devices or read["device_id"] in rule.devices)
                and (not rule.site or device.site == rule.site)
                and (not rule.room or device.room == rule.room)
            ):
                expected += alone.evaluate(read, read["ts"])
        assert [a for a in got if a.rule == rule.id] == expected, rule.id
    assert len(got) > 15


def test_rate_rules_sharing_a_window_alert_like_separate_engines_across_scope_changes() -> None:
    """Rate rules sharing windows alert like separate engines, through scope moves and a restart."""
    rising = {"kind": "rate", "metric": "temperature_c", "per_minute": 2.0, "window": "2m"}
    rules = RulesFile.model_validate({"rules": [
        {**rising, "id": "all"}, {**rising, "id": "home", "site": "home"},
        {**rising, "id": "slow", "per_minute": 5.0}, {**rising, "id": "short", "window": "1m"},
    ]}).rules  # fmt: skip
    moves = {20: "office", 33: "home", 60: "office", 66: "home"}
    registry = {"m": Device(device_id="m", type=DeviceType.THERMOSTAT, registered_at=0,
                            site="home")}  # fmt: skip
    workload: list[tuple[Device, CanonicalReading]] = []
    for step in range(120):
        if step in moves:
            registry["m"] = registry["m"].model_copy(update={"site": moves[step]})
        ts = T0 + step * 10_000
        value = 20 + (step % 30) * (0.6 if step % 60 < 30 else -0.1)
        workload.append((registry["m"], reading("m", ts, temperature_c=value)))

    def run(engine: RuleEngine, part: list[tuple[Device, CanonicalReading]]) -> list[Alert]:
        alerts: list[Alert] = []
        for device, read in part:
            registry["m"] = device
            alerts += engine.evaluate(read, read["ts"])
        return alerts

    shared = RuleEngine(rules, registry.get, grace_ms=0)
    got = run(shared, workload[:70])
    assert shared.states[("all", "m")].points is shared.states[("slow", "m")].points
    records = dict(shared.records(shared.states))
    assert records == {key: to_json(record_of(s)) for key, s in shared.states.items()}
    restarted = RuleEngine(rules, registry.get, grace_ms=0)
    restarted.states.update(
        (key, RuleState.from_dict(from_json(value)))
        for key, value in records.items()
        if value is not None
    )
    got += run(restarted, workload[70:])
    for rule in rules:
        alone = RuleEngine([rule.model_copy(update={"site": None})], lambda d: None, grace_ms=0)
        expected = [
            alert
            for device, read in workload
            if not rule.site or device.site == rule.site
            for alert in alone.evaluate(read, read["ts"])
        ]
        assert [a for a in got if a.rule == rule.id] == expected, rule.id
    assert {a.rule for a in got} == {"all", "home", "slow", "short"}


@pytest.mark.parametrize(
    "value",
    [b"{", b"[]", b'{"device_id": "a", "type": "thermostat", "ts": "x", "metrics": {}}',
     b'{"device_id": "a", "type": "thermostat", "ts": 1, "metrics": {"t": "hot"}}',
     b'{"device_id": "a", "type": "thermostat", "ts": 1}'],
)  # fmt: skip
def test_decode_reading_refuses_what_is_not_a_canonical_reading(value: bytes) -> None:
    """A record the engine could not evaluate is refused at decoding, before its batch."""
    with pytest.raises(ValueError, match=r"not a canonical reading|JSON|EOF"):
        decode_reading(value)
