"""Rule evaluation without servers: thresholds with `for` and hysteresis, state, rate,
absence, scopes, out-of-order readings, and rules files with located errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.domain.records import CanonicalReading
from gateway.domain.rules import Alert, RuleEngine
from gateway.domain.rules_file import RulesFileError, load_rules
from schemas import Device, DeviceType
from schemas.rules import RulesFile

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


def engine(*rules: dict[str, Any], grace_ms: int = 0) -> RuleEngine:
    parsed = RulesFile.model_validate({"rules": list(rules)}).rules
    return RuleEngine(
        parsed, DEVICES.get, grace_ms=grace_ms, devices=lambda: DEVICES.values(), started_ms=T0
    )


def reading(device_id: str, ts: int, **metrics: Any) -> CanonicalReading:
    device = DEVICES.get(device_id)
    device_type = device.type.value if device else "thermostat"
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
    assert {r.kind for r in rules} == {"threshold", "absence", "rate", "state"}
    covered = {t for r in rules for t in (r.device_types or list(DeviceType))}
    assert covered == set(DeviceType)
    demo = load_rules(ROOT / "simulators" / "demo-rules.yaml").rules
    assert {r.kind for r in demo} == {"threshold", "absence", "rate", "state"}


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
