"""The device sources' adapters on real messages from each project's documentation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from gateway.domain.ratelimit import RateLimiter
from gateway.domain.sources import (
    HomeAssistant,
    Sources,
    SourcesFileError,
    device_id_of,
    infer_type,
    parse_sources,
)
from gateway.domain.sources.base import topic_matches
from gateway.domain.validation import Accepted, Outcome, Presence, ReadingValidator, Rejected
from gateway.errors import ConfigError
from gateway.settings import Settings
from gateway.topics import MQTT_STATUS_FILTER, MQTT_TELEMETRY_FILTER
from schemas import Device
from simulators.bench.sources import measure
from tests.sources import SOURCES, Case, Fixture, load_fixture

pytestmark = pytest.mark.unit

RECEIVED_AT = 1_795_680_000_000
FIXTURES = {source: load_fixture(source) for source in SOURCES}
CASES = [
    pytest.param(FIXTURES[source], case, id=f"{source}-{case.kind}-{n}")
    for source in SOURCES
    for n, case in enumerate(FIXTURES[source].cases)
]


def judge(fixture: Fixture, case: Case) -> tuple[list[Outcome], ReadingValidator]:
    """The outcomes of one fixture message, every device of the fixture registered."""
    registry = {d.device_id: d for d in fixture.devices(fixture.sources())}
    sources = fixture.sources()
    if case.config is not None:
        assert sources.homeassistant is not None
        sources.homeassistant.learn(*case.config)
        if "removal_payload_text" in case.entry:
            sources.homeassistant.learn(case.config[0], case.entry["removal_payload_text"].encode())
    route = sources.route(case.topic)
    device_id = case.device_id or (route[1] if route else None)
    if device_id in registry:  # as this case registers it
        registry[device_id] = registry[device_id].model_copy(
            update={"type": case.entry["type"], "tz": case.entry.get("tz")}
        )
    validator = ReadingValidator(
        registry.get,
        require_registration=True,
        max_age_ms=100 * 365 * 24 * 3600 * 1000,  # the docs' examples are years old
        limiter=RateLimiter(1.0, 1000),
        sources=sources,
        clock=lambda: 0.0,
    )
    if not subscribed(sources, case.topic):
        return [], validator  # the broker would not send it
    expected = case.entry.get("expected") or {}
    received_at = max(RECEIVED_AT, (expected.get("ts") or 0) + 1000)
    return validator.process(case.topic, case.payload, received_at), validator


def subscribed(sources: Sources, topic: str) -> bool:
    """Whether the bridge subscribes to `topic` (our envelope's, a source's, a learned one)."""
    learned = sources.homeassistant.filters if sources.homeassistant else ()
    filters = (MQTT_TELEMETRY_FILTER, MQTT_STATUS_FILTER, *sources.filters, *learned)
    return any(topic_matches(f, topic) for f in filters)


@pytest.mark.parametrize(("fixture", "case"), CASES)
def test_documented_message_gives_its_canonical_reading(fixture: Fixture, case: Case) -> None:
    """Each documented message gives the reading, nothing, or the dead letter its fixture says."""
    outcomes, validator = judge(fixture, case)
    if case.kind == "no_reading" and "also_configured" in case.entry:
        # Zigbee2MQTT's own discovery config: its state is read once, by that source.
        assert [type(o) for o in outcomes] == [Accepted], case.entry["why"]
        return
    if case.kind == "no_reading":
        assert outcomes == [], case.entry["why"]
        return
    if case.kind == "availability":
        [presence] = outcomes
        assert isinstance(presence, Presence), presence
        record = json.loads(presence.value)
        assert record == {**case.entry["expected"], "ts": ANY, "source": fixture.source}
        return
    if case.kind == "malformed":
        assert [type(o) for o in outcomes] == [Rejected], case.entry["why"]
        assert isinstance(outcomes[0], Rejected)
        assert outcomes[0].reason == case.entry["reason"], outcomes[0].detail
        return
    expected = case.entry["expected"]
    [accepted] = outcomes
    assert isinstance(accepted, Accepted), accepted
    record = json.loads(accepted.value)
    assert record["device_id"] == expected["device_id"]
    assert record["type"] == case.entry["type"]
    assert record["metrics"] == expected["metrics"]
    assert accepted.device_time == (expected["ts_source"] == "device")
    if expected["ts"] is not None:
        assert record["ts"] == expected["ts"]
    ignored = {name for (source, name) in validator.ignored}
    assert ignored == set(case.entry["ignored"])
    route = fixture.sources().route(case.topic)
    if fixture.source != "homeassistant":
        assert route is not None
        decoded = route[0].decode(case.topic, case.payload)
        assert infer_type(decoded[0].metrics) == expected["inferred_type"]


def test_inference_prefers_the_telling_metric() -> None:
    """A battery sensor's voltage does not make it a plug; a TRV is a thermostat."""
    assert infer_type({"battery_pct", "voltage_v", "temperature_c"}) == "climate"
    assert infer_type({"battery_pct", "voltage_v"}) is None
    assert infer_type({"temperature_c", "setpoint_c"}) == "thermostat"
    assert infer_type({"on", "voltage_v"}) == "smart_plug"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sources: [{adapter: zigbee}]", "sources.0: Input tag 'zigbee' found using 'adapter'"),
        ("sources: [{adapter: tasmota, base_topic: x}]", "sources.0.tasmota.base_topic: Extra"),
        ("sources: [{adapter: zigbee2mqtt, base_topic: 'a/#'}]", "base_topic: String should"),
        ("sources: [{adapter: shelly, id_prefix: 'a b'}]", "id_prefix: String should match"),
        ("sources: [{adapter: shelly}, {adapter: shelly}]", "each adapter may be listed once"),
        ("- adapter: shelly", "file: must be a mapping with a `sources:` list"),
        ("sources: [", "not YAML (line 1)"),
    ],
)
def test_a_bad_sources_file_is_one_line_naming_the_place(text: str, message: str) -> None:
    """Every mistake in sources.yaml stops the bridge with one line saying where."""
    with pytest.raises(SourcesFileError) as caught:
        parse_sources(text, "sources.yaml")
    assert str(caught.value).startswith("sources.yaml: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_settings_read_the_sources_file_or_none(tmp_path: Path) -> None:
    """No sources file means our envelope only; a bad one is a ConfigError naming the variable."""
    assert not Settings(sources_file=tmp_path / "absent.yaml").sources()
    bad = tmp_path / "sources.yaml"
    bad.write_text("sources: [{adapter: lora}]")
    with pytest.raises(ConfigError, match=r"^IOTGW_SOURCES_FILE: .*sources\.yaml: sources\.0"):
        Settings(sources_file=bad).sources()
    bad.write_text("sources: [{adapter: zigbee2mqtt, base_topic: z}, {adapter: homeassistant}]")
    sources = Settings(sources_file=bad).sources()
    assert sources.filters == ("z/#",)
    assert sources.homeassistant is not None
    assert sources.homeassistant.config_filters == (
        "homeassistant/+/+/config", "homeassistant/+/+/+/config"
    )  # fmt: skip


def test_a_device_id_is_the_native_one_made_safe() -> None:
    """Characters outside [A-Za-z0-9_-] become `_`, after the prefix, cut to 64."""
    assert device_id_of("living room/climate", "z2m-") == "z2m-living_room_climate"
    assert device_id_of("x" * 80) == "x" * 64
    assert device_id_of("Küche") == "K_che"


def source_validator(registry: dict[str, Device], sources: Sources) -> ReadingValidator:
    return ReadingValidator(
        registry.get,
        require_registration=False,
        max_age_ms=100 * 365 * 24 * 3600 * 1000,
        limiter=RateLimiter(1000.0, 1000),
        sources=sources,
        clock=lambda: 0.0,
    )


def accepted(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    assert all(isinstance(o, Accepted) for o in outcomes), outcomes
    return [json.loads(o.value) for o in outcomes if isinstance(o, Accepted)]


def test_readings_timed_by_the_gateway_keep_one_point_each() -> None:
    """A backlog received in one go: each reading without a device time gets its own
    millisecond, in arrival order, so InfluxDB keeps every one."""
    validator = source_validator({}, parse_sources("sources: [{adapter: zigbee2mqtt}]"))
    records = [
        r for n in range(3)
        for r in accepted(validator.process("zigbee2mqtt/lamp", b'{"state":"ON"}', RECEIVED_AT))
    ]  # fmt: skip
    assert [r["ts"] for r in records] == [RECEIVED_AT, RECEIVED_AT + 1, RECEIVED_AT + 2]


def test_a_local_time_the_clock_change_repeats_is_the_instant_nearer_arrival() -> None:
    """02:30 on 2026-10-25 happens twice in Berlin: the one nearer the receive time wins."""
    berlin = {"p": Device(device_id="p", type="smart_plug", tz="Europe/Berlin", registered_at=0)}
    validator = source_validator(berlin, parse_sources("sources: [{adapter: tasmota}]"))
    message = b'{"Time":"2026-10-25T02:30:00","ENERGY":{"Power":5}}'
    first = 1_792_888_200_000  # 00:30Z, 02:30 summer time
    second = first + 3_600_000  # 01:30Z, 02:30 winter time
    for received in (first + 5_000, second + 5_000):
        [record] = accepted(validator.process("tele/p/SENSOR", message, received))
        assert record["ts"] == received - 5_000


def test_an_unregistered_device_keeps_the_type_it_was_first_told() -> None:
    """A TRV's message with only its temperature stays a thermostat; a message with
    nothing the gateway reads gives nothing, not a dead letter."""
    validator = source_validator({}, parse_sources("sources: [{adapter: zigbee2mqtt}]"))
    full = b'{"local_temperature":19.5,"occupied_heating_setpoint":21}'
    [first] = accepted(validator.process("zigbee2mqtt/trv", full, RECEIVED_AT))
    [later] = accepted(
        validator.process("zigbee2mqtt/trv", b'{"local_temperature":20}', RECEIVED_AT)
    )
    assert first["type"] == later["type"] == "thermostat"
    assert validator.process("zigbee2mqtt/plug", b'{"linkquality":80}', RECEIVED_AT) == []


def test_numbers_no_conversion_takes_are_dead_letters() -> None:
    """1e400 °F, a Shelly time past year 9999: a `schema` dead letter, never an exception."""
    huge = "1" + "0" * 400
    energy = f'{{"aenergy":{{"total":{huge}}}}}'
    registry = {
        "p": Device(device_id="p", type="climate", registered_at=0),
        "ht": Device(device_id="ht", type="smart_plug", registered_at=0),
    }
    sources = parse_sources(
        "sources: [{adapter: tasmota}, {adapter: shelly}, {adapter: zigbee2mqtt}]"
    )
    validator = source_validator(registry, sources)
    for topic, payload in (
        ("tele/p/SENSOR", f'{{"TempUnit":"F","AM2301":{{"Temperature":{huge}}}}}'),
        ("ht/events/rpc", f'{{"method":"NotifyStatus","params":{{"ts":{huge}}}}}'),
        ("ht/events/rpc", '{"method":"NotifyStatus","params":{"ts":1e308}}'),
        ("ht/events/rpc", f'{{"method":"NotifyStatus","params":{{"switch:0":{energy}}}}}'),
        ("zigbee2mqtt/p", f'{{"temperature":1,"last_seen":{huge}}}'),
    ):  # fmt: skip
        [outcome] = validator.process(topic, payload.encode(), RECEIVED_AT)
        assert isinstance(outcome, Rejected)
        assert outcome.reason == "schema", outcome.detail


@pytest.mark.parametrize(
    ("state_topic", "why"),
    [
        ("devices/t1/telemetry", "read by another source already"),
        ("$SYS/broker/uptime", "is not a topic the bridge reads"),
        ("home/a\tb", "is not a topic the bridge reads"),
        ("home/" + "x" * 2000, "is not a topic the bridge reads"),
        ("home/+/t", "is not a topic the bridge reads"),
        ("home/shared", "is other's already"),
    ],
)
def test_discovery_refuses_state_topics_the_bridge_must_not_read(
    state_topic: str, why: str
) -> None:
    """Our envelope's topics, system topics, names Mosquitto refuses, filters, and a topic
    another device's entity reads (a message is one device's) are not learned."""
    ha = HomeAssistant("ha", taken=("devices/+/telemetry",))
    ha.learn("ha/sensor/other/config", ha_config("home/shared", "other"))
    change = ha.learn("ha/sensor/mine/config", ha_config(state_topic, "mine"))
    assert change.subscribe == ()
    assert change.problem is not None
    assert why in change.problem


def test_a_hostile_template_is_refused_at_once() -> None:
    """A template that would make a regular expression backtrack is refused in microseconds."""
    template = "{{ value" + " | round(1111111111)" * 8 + " }x"
    ha = HomeAssistant("ha")
    started = time.perf_counter()
    change = ha.learn("ha/sensor/t/config", ha_config("home/t", "t", val_tpl=template))
    assert time.perf_counter() - started < 0.1
    assert change.problem is not None
    assert "outside the subset" in change.problem


def ha_config(state_topic: str, device: str, **keys: str) -> bytes:
    config = {"dev_cla": "temperature", "stat_t": state_topic, "dev": {"ids": [device]}, **keys}
    return json.dumps(config).encode()


def test_the_sources_benchmark_measures_every_format() -> None:
    """`python -m simulators.bench.sources`: each format's message is accepted and timed."""
    results = measure(200)
    assert set(results) == {"envelope", *SOURCES}
    assert all(us > 0 for us in results.values())
