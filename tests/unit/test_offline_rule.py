"""The `offline` rule without servers: availability records in, alerts out, with `for`,
scopes, an engine that was behind, a restart from the state records, and rules files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic_core import from_json
from typer.testing import CliRunner

from gateway.cli.app import app
from gateway.domain.records import AvailabilityRecord, CanonicalReading
from gateway.domain.rules import Alert, RuleEngine, RuleState, decode_availability
from gateway.domain.rules_file import RulesFileError, load_rules
from schemas import Device, DeviceType
from schemas.rules import OfflineRule, RulesFile

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_795_680_000_000
DEVICES = {
    "plug": Device(device_id="plug", type=DeviceType.SMART_PLUG, registered_at=0, site="home",
                   room="kitchen"),
    "door": Device(device_id="door", type=DeviceType.CONTACT, registered_at=0, site="office"),
}  # fmt: skip
GONE = {"id": "gone", "kind": "offline", "for": "30s"}


def engine(*rules: dict[str, Any]) -> RuleEngine:
    parsed = RulesFile.model_validate({"rules": list(rules)}).rules
    return RuleEngine(parsed, DEVICES.get, grace_ms=0, devices=DEVICES.values, started_ms=T0)


def said(device_id: str, online: bool, offset_s: float) -> AvailabilityRecord:
    """What the bridge puts in iot.availability when the device says so at T0 + offset_s."""
    return AvailabilityRecord(
        device_id=device_id, online=online, ts=T0 + int(offset_s * 1000), source="envelope"
    )


def states(alerts: list[Alert]) -> list[tuple[str, str, str, Any, int]]:
    return [(a.rule, a.device_id, a.state, a.value, a.ts - T0) for a in alerts]


def test_without_for_fires_at_the_offline_record_and_resolves_when_online() -> None:
    """`for` left out: firing (value 0) at the offline record, once even if the last will
    comes twice; resolved (value 1) by the online record, once."""
    rules = engine({"id": "gone", "kind": "offline"})
    alerts = rules.evaluate_availability([said("plug", True, 0), said("plug", False, 10)])
    alerts += rules.evaluate_availability([said("plug", False, 12)])
    alerts += rules.tick(T0 + 60_000)
    alerts += rules.evaluate_availability([said("plug", True, 70), said("plug", True, 80)])
    assert states(alerts) == [
        ("gone", "plug", "firing", 0, 10_000),
        ("gone", "plug", "resolved", 1, 70_000),
    ]
    assert [a.message for a in alerts] == ["offline", "online again after 60 s"]
    assert rules.states == {}


def test_for_fires_on_the_wall_clock_once_the_device_stayed_offline() -> None:
    """Offline at 10 s with `for: 30s`: nothing at 39 s, firing at the tick past 40 s with
    the time it became true, nothing more on later ticks; online resolves it."""
    rules = engine(GONE)
    assert rules.evaluate_availability([said("plug", False, 10)]) == []
    assert rules.tick(T0 + 39_000) == []
    fired = rules.tick(T0 + 40_500)
    later = rules.tick(T0 + 90_000)
    resolved = rules.evaluate_availability([said("plug", True, 95)])
    assert states(fired) == [("gone", "plug", "firing", 0, 40_000)]
    assert fired[0].message == "offline for 30 s"
    assert later == []
    assert states(resolved) == [("gone", "plug", "resolved", 1, 95_000)]


def test_back_online_within_for_gives_no_alert() -> None:
    """Offline for 20 s of a 30 s `for`: no alert then, nor on any later tick."""
    rules = engine(GONE)
    alerts = rules.evaluate_availability([said("plug", False, 10), said("plug", True, 30)])
    alerts += rules.tick(T0 + 45_000) + rules.tick(T0 + 600_000)
    assert alerts == []
    assert rules.states == {}


def test_an_engine_behind_reports_both_transitions_of_an_outage_it_saw_late() -> None:
    """Offline 60 s and online again, both read in one batch before any tick (the engine
    was down or behind): the firing and the resolved are both reported, in order."""
    rules = engine(GONE)
    alerts = rules.evaluate_availability([said("plug", False, 10), said("plug", True, 70)])
    assert states(alerts) == [
        ("gone", "plug", "firing", 0, 40_000),
        ("gone", "plug", "resolved", 1, 70_000),
    ]


StateTopic = dict[tuple[str, str], bytes | None]


def committed(rules: RuleEngine, topic: StateTopic) -> None:
    """What the service commits after a batch: the changed states' records (compacted)."""
    topic.update(rules.records(rules.changed))
    rules.changed.clear()


def restarted(topic: StateTopic) -> RuleEngine:
    """A new engine given back the state records, as the service reads them at start."""
    after = engine(GONE)
    for key, value in topic.items():
        after.restore(key, None if value is None else RuleState.from_dict(from_json(value)))
    return after


def test_a_restart_resumes_the_for_and_neither_repeats_nor_misses_an_alert() -> None:
    """Engines restarted from the state records: a device waiting out `for` fires once, a
    firing one is not fired again and resolves once, a resolved one stays quiet."""
    topic: StateTopic = {}
    first = engine(GONE)
    first.evaluate_availability([said("door", False, 10), said("plug", False, 20)])
    assert states(first.tick(T0 + 41_000)) == [("gone", "door", "firing", 0, 40_000)]
    committed(first, topic)
    second = restarted(topic)
    alerts = second.tick(T0 + 49_000) + second.tick(T0 + 51_000)
    alerts += second.evaluate_availability([said("door", True, 60)])
    assert states(alerts) == [
        ("gone", "plug", "firing", 0, 50_000),
        ("gone", "door", "resolved", 1, 60_000),
    ]
    committed(second, topic)
    third = restarted(topic)
    alerts = third.tick(T0 + 65_000)
    alerts += third.evaluate_availability([said("plug", True, 70), said("door", True, 75)])
    alerts += third.tick(T0 + 200_000)
    assert states(alerts) == [("gone", "plug", "resolved", 1, 70_000)]
    committed(third, topic)
    assert topic == {("gone", "door"): None, ("gone", "plug"): None}


def test_scope_by_device_types_devices_site_and_room_and_readings_do_not_count() -> None:
    """Only devices in scope alert (a device unknown to the registry only for a rule without
    a type, site or room); a reading, even a device's first, neither fires nor resolves."""
    rules = engine(
        {"id": "plugs", "kind": "offline", "device_types": ["smart_plug"]},
        {"id": "listed", "kind": "offline", "devices": ["door"]},
        {"id": "office", "kind": "offline", "site": "office"},
        {"id": "kitchen", "kind": "offline", "room": "kitchen"},
        {"id": "any", "kind": "offline"},
    )
    reading = CanonicalReading(device_id="plug", type="smart_plug", ts=T0, seq=None,
                               metrics={"on": True}, received_at=T0)  # fmt: skip
    assert rules.evaluate(reading, T0) == []
    alerts = rules.evaluate_availability(
        [said("plug", False, 1), said("door", False, 1), said("stranger", False, 1)]
    )
    assert rules.evaluate(reading, T0 + 2000) == []
    assert {(a.rule, a.device_id) for a in alerts} == {
        ("plugs", "plug"), ("kitchen", "plug"), ("any", "plug"),
        ("listed", "door"), ("office", "door"), ("any", "door"), ("any", "stranger"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "value",
    [b"{", b'{"device_id": "a", "online": "no", "ts": 1}', b'{"device_id": "a", "online": true}',
     b'{"online": false, "ts": 1}', b"[]"],
)  # fmt: skip
def test_decode_availability_refuses_what_is_not_an_availability_record(value: bytes) -> None:
    """A record the engine could not evaluate is refused at decoding, before its batch."""
    with pytest.raises(ValueError, match=r"not an availability record|JSON|EOF"):
        decode_availability(value)


def test_rules_yaml_example_validates_and_for_defaults_to_zero(tmp_path: Path) -> None:
    """`iotgw rules validate` accepts rules.yaml's offline example; `for` defaults to 0 s and
    a bad duration is reported with its line and field."""
    [example] = [r for r in load_rules(ROOT / "rules.yaml").rules if r.kind == "offline"]
    assert isinstance(example, OfflineRule)
    assert example.for_ == 300
    result = CliRunner().invoke(app, ["rules", "validate", str(ROOT / "rules.yaml")])
    assert result.exit_code == 0, result.output
    assert "1 offline" in result.output
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {id: a, kind: offline}\n  - id: b\n    kind: offline\n"
                    "    for: soon\n")  # fmt: skip
    with pytest.raises(RulesFileError) as caught:
        load_rules(path)
    assert caught.value.problems == [
        f"{path}:5: rules[1].for: a duration is a number and a unit: 500ms, 30s, 5m, 1h, 2d"
    ]
    path.write_text("rules:\n  - {id: a, kind: offline}\n")
    [rule] = load_rules(path).rules
    assert isinstance(rule, OfflineRule)
    assert rule.for_ == 0


def test_no_timer_fires_while_availability_records_are_still_unread() -> None:
    """A tick of an engine behind on iot.availability fires nothing: an online record may
    be waiting; it fires on the first tick caught up."""
    rules = engine(GONE)
    rules.evaluate_availability([said("plug", False, 10)])
    assert rules.tick(T0 + 60_000, offline=False) == []
    assert states(rules.tick(T0 + 61_000)) == [("gone", "plug", "firing", 0, 40_000)]
