"""Device sources through real Mosquitto, the live bridge and Kafka: what each format becomes."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.clock import now_ms
from gateway.domain.sources import HomeAssistant
from gateway.services.bridge.session import Bridge
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device
from tests.conftest import unique
from tests.sources import SOURCES, Case, load_fixture
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    register,
    running_bridge,
    until,
)

pytestmark = pytest.mark.integration

BERLIN = ZoneInfo("Europe/Berlin")


def sources_file(directory: Path, entries: list[dict[str, Any]]) -> Path:
    path = directory / "sources.yaml"
    path.write_text(json.dumps({"sources": entries}))  # JSON is YAML
    return path


@pytest.fixture
async def source_settings(settings: Settings, tmp_path: Path) -> AsyncIterator[Settings]:
    """A bridge of its own reading every adapter, under this test's own topics and ids."""
    base = unique("z2m")
    own = await own_settings(
        settings,
        sources_file=sources_file(
            tmp_path,
            [
                {"adapter": "zigbee2mqtt", "base_topic": base},
                {"adapter": "tasmota"},
                {"adapter": "shelly"},
                {"adapter": "homeassistant", "discovery_prefix": unique("ha")},
            ],
        ),
    )
    yield own
    await forget_session(own)


def device(device_id: str, kind: str, tz: str | None = None) -> Device:
    return Device(device_id=device_id, type=kind, tz=tz, registered_at=0)


def headers(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


async def test_each_format_arrives_with_units_types_time_and_ts_source(
    source_settings: Settings,
) -> None:
    """A Zigbee2MQTT climate sensor, a Tasmota plug (local time), a Shelly plug (ts in
    seconds, Wh) land in iot.readings as canonical readings with the right header."""
    s = source_settings
    base = s.sources().adapters[0].filters[0].removesuffix("/#")
    climate, plug, shelly = unique("climate"), unique("tasmota"), unique("shellyplus1pm")
    await register(
        s,
        device(climate, "climate"),
        device(plug, "smart_plug", tz="Europe/Berlin"),
        device(shelly, "smart_plug"),
    )
    # Tasmota's `Time`: the plug's local time, without an offset.
    local = datetime.now(BERLIN).strftime("%Y-%m-%dT%H:%M:%S")
    before = now_ms()
    async with (
        running_bridge(s) as bridge,
        TopicReader(s, Topics(s.topic_prefix).readings) as readings,
    ):
        async with DevicePublisher(s.mqtt.host, s.mqtt.port) as publisher:
            await publisher.publish(
                f"{base}/{climate}",
                json.dumps(
                    {"temperature": 21.5, "humidity": 48, "pressure": 1012.3, "battery": 91,
                     "voltage": 2985, "linkquality": 120}
                ).encode(),
            )  # fmt: skip
            await publisher.publish(
                f"tele/{plug}/SENSOR",
                json.dumps(
                    {"Time": local, "ENERGY": {"Total": 12.5, "Power": 42, "Voltage": 231,
                     "Current": 0.2, "Factor": 0.9}}
                ).encode(),
            )  # fmt: skip
            await publisher.publish(
                f"{shelly}/events/rpc",
                json.dumps(
                    {"src": shelly, "dst": f"{shelly}/events", "method": "NotifyStatus",
                     "params": {"ts": before / 1000, "switch:0": {"id": 0, "output": True,
                     "apower": 8.9, "aenergy": {"total": 1500.5}}}}
                ).encode(),
            )  # fmt: skip
        await readings.wait_for(3)
        metrics = bridge.metrics
        await until(lambda: metrics.source_readings.labels("shelly")._value.get() == 1, 5, "counts")
        assert metrics.source_readings.labels("zigbee2mqtt")._value.get() == 1
        assert metrics.source_readings.labels("tasmota")._value.get() == 1
        for source, field in (
            ("zigbee2mqtt", "linkquality"), ("zigbee2mqtt", "voltage"), ("tasmota", "ENERGY.Factor")
        ):  # fmt: skip
            assert metrics.ignored_fields.labels(source, field)._value.get() == 1, field
    after = now_ms()
    by_device = {json.loads(r.value)["device_id"]: r for r in readings.records}
    first = json.loads(by_device[climate].value)
    assert first["type"] == "climate"
    assert first["metrics"] == {
        "temperature_c": 21.5, "humidity_pct": 48.0, "pressure_hpa": 1012.3, "battery_pct": 91.0
    }  # fmt: skip
    assert before <= first["ts"] <= after
    assert headers(by_device[climate])["ts_source"] == b"gateway"
    second = json.loads(by_device[plug].value)
    assert second["metrics"] == {
        "energy_kwh": 12.5, "power_w": 42.0, "voltage_v": 231.0, "current_a": 0.2
    }  # fmt: skip
    assert second["ts"] == datetime.fromisoformat(local).replace(tzinfo=BERLIN).timestamp() * 1000
    assert headers(by_device[plug])["ts_source"] == b"device"
    third = json.loads(by_device[shelly].value)
    assert third["metrics"] == {"on": True, "power_w": 8.9, "energy_kwh": 1.5005}
    assert third["ts"] == before
    assert headers(by_device[shelly])["ts_source"] == b"device"


def ha_config(state_topic: str, device_id: str, **keys: Any) -> bytes:
    """A discovery config as Home Assistant's docs write them (abbreviated keys)."""
    return json.dumps(
        {"name": "Temperature", "dev_cla": "temperature", "stat_t": state_topic,
         "unit_of_meas": "°C", "val_tpl": "{{ value_json.temperature }}",
         "uniq_id": f"{device_id}-t", "dev": {"ids": [device_id], "name": "Bedroom"}, **keys}
    ).encode()  # fmt: skip


async def test_discovery_configs_map_state_topics_until_changed_or_removed(
    source_settings: Settings,
) -> None:
    """A retained config read at start maps its state topic; a changed config (°F) changes
    the mapping; states sent while the bridge was away are read with the config in force;
    an empty retained config stops it."""
    s = source_settings
    homeassistant = s.sources().homeassistant
    assert homeassistant is not None
    prefix = homeassistant.discovery_prefix
    sensor = unique("bedroom")
    await register(s, device(sensor, "climate"))
    config_topic = f"{prefix}/sensor/{sensor}/temperature/config"
    state_topic = f"{prefix}/sensor/{sensor}/state"

    def unit_in_force(bridge: Bridge) -> float | None:
        """What 122 in the entity's unit is in °C, as the bridge's session reads it."""
        learned = bridge.sources.homeassistant
        entity = learned.entities.get(config_topic) if learned else None
        return entity.convert(122) if entity and entity.convert else None

    try:
        async with (
            TopicReader(s, Topics(s.topic_prefix).readings) as readings,
            DevicePublisher(s.mqtt.host, s.mqtt.port) as publisher,
        ):
            await publisher.publish(config_topic, ha_config(state_topic, sensor), retain=True)
            async with running_bridge(s) as bridge:
                await publisher.publish(state_topic, b'{"temperature": 20.5}')
                await readings.wait_for(1)
                fahrenheit = ha_config(state_topic, sensor, unit_of_meas="°F")
                await publisher.publish(config_topic, fahrenheit, retain=True)
                # Configs come on a connection of their own: wait until it is in force.
                await until(lambda: unit_in_force(bridge) == 50, 10, "the °F config read")
                await publisher.publish(state_topic, b'{"temperature": 122}')
                await readings.wait_for(2)
            # Away: the state waits in the bridge's session, read with the config at start.
            await publisher.publish(state_topic, b'{"temperature": 32}')
            async with running_bridge(s) as bridge:
                await readings.wait_for(3)
                await publisher.publish(config_topic, b"", retain=True)
                await until(lambda: unit_in_force(bridge) is None, 10, "the removal read")
                await publisher.publish(state_topic, b'{"temperature": 50}')
                # The same device in our envelope, after it: once this is in its partition,
                # the state before it was judged.
                await publisher.publish(
                    f"devices/{sensor}/telemetry",
                    json.dumps(
                        {"type": "climate", "ts": now_ms(), "metrics": {"humidity_pct": 40}}
                    ).encode(),
                )
                await readings.wait_for(4)
    finally:
        async with DevicePublisher(s.mqtt.host, s.mqtt.port) as publisher:
            await publisher.publish(config_topic, b"", retain=True)
    values = [json.loads(r.value) for r in readings.records]
    assert [v["metrics"] for v in values] == [
        {"temperature_c": 20.5}, {"temperature_c": 50.0}, {"temperature_c": 0.0},
        {"humidity_pct": 40.0},
    ]  # fmt: skip
    assert {v["device_id"] for v in values} == {sensor}


@pytest.mark.parametrize("source", SOURCES)
async def test_documented_messages_through_the_live_bridge(
    settings: Settings, tmp_path: Path, source: str
) -> None:
    """Every documented example of a source, published to Mosquitto, reaches iot.readings
    as its canonical reading (per device, in order, with its ts_source), and every
    malformed variant reaches the dead-letter topic with its reason."""
    fixture = load_fixture(source)
    sources = fixture.sources()
    registry = fixture.devices(sources)
    types = {d.device_id: d.type for d in registry}
    # One registration per device: cases that register it as another type are the unit
    # tests' (tests/unit/test_sources.py).
    cases = [
        c for c in fixture.cases
        if c.kind != "no_reading"
        and types.get(c.device_id or "", c.entry["type"]) == c.entry["type"]
    ]  # fmt: skip
    entries = [fixture.sources_yaml] + [
        e for c in cases for e in c.entry.get("also_configured", [])
    ]
    s = await own_settings(
        settings,
        sources_file=sources_file(tmp_path, entries),
        max_reading_age_s=100 * 365 * 24 * 3600,  # the docs' examples are years old
    )
    await register(s, *registry)
    topics = Topics(s.topic_prefix)
    configs = [c.config for c in cases if c.config is not None]
    before = now_ms()
    try:
        async with (
            TopicReader(s, topics.readings) as readings,
            TopicReader(s, topics.dead_letters) as dead_letters,
            TopicReader(s, topics.availability) as availability,
            running_bridge(s) as bridge,
            DevicePublisher(s.mqtt.host, s.mqtt.port) as publisher,
        ):
            examples = [c for c in cases if c.kind == "examples"]
            malformed = [c for c in cases if c.kind == "malformed"]
            presences = [c for c in cases if c.kind == "availability"]
            for number, case in enumerate(cases):
                if case.config is None:
                    await publisher.publish(case.topic, case.payload)
                    continue
                # Entities of several examples share state topics: one config at a time.
                await publisher.publish(*case.config, retain=True)
                await until(functools.partial(learned, bridge, case), 10, "the config read")
                await publisher.publish(case.topic, case.payload)
                done = cases[: number + 1]
                await readings.wait_for(sum(c.kind == "examples" for c in done))
                await dead_letters.wait_for(sum(c.kind == "malformed" for c in done))
                await publisher.publish(case.config[0], b"", retain=True)
                await until(functools.partial(forgotten, bridge, case), 10, "the config removed")
            await readings.wait_for(len(examples))
            await dead_letters.wait_for(len(malformed))
            await availability.wait_for(len(presences))
    finally:
        async with DevicePublisher(s.mqtt.host, s.mqtt.port) as publisher:
            for topic, _ in configs:
                await publisher.publish(topic, b"", retain=True)
        await forget_session(s)
    after = now_ms()
    got: dict[str, list[tuple[dict[str, Any], bytes]]] = {}
    for record in readings.records:
        value = json.loads(record.value)
        if value["ts"] is not None and headers(record)["ts_source"] == b"gateway":
            assert before <= value["ts"] <= after
            value["ts"] = None
        got.setdefault(value["device_id"], []).append((value, headers(record)["ts_source"]))
    wanted: dict[str, list[tuple[dict[str, Any], bytes]]] = {}
    for case in examples:
        expected = case.entry["expected"]
        value = {
            "device_id": expected["device_id"], "type": case.entry["type"], "ts": expected["ts"],
            "seq": None, "metrics": expected["metrics"],
        }  # fmt: skip
        wanted.setdefault(expected["device_id"], []).append((value, expected["ts_source"].encode()))
    for found in got.values():
        for value, _ in found:
            del value["received_at"]
    assert got == wanted
    reasons = sorted(headers(r)["error"].decode() for r in dead_letters.records)
    assert reasons == sorted(c.entry["reason"] for c in malformed)
    said = [(v["device_id"], v["online"], v["source"]) for v in availability.values()]
    assert said == [
        (c.entry["expected"]["device_id"], c.entry["expected"]["online"], source) for c in presences
    ]


def learned(bridge: Bridge, case: Case) -> bool:
    """Whether the bridge's session reads the case's discovery config as it is now."""
    assert case.config is not None
    assert bridge.sources.homeassistant is not None
    topic, payload = case.config
    own = HomeAssistant(bridge.sources.homeassistant.discovery_prefix)
    own.learn(topic, payload)
    theirs = bridge.sources.homeassistant.entities
    return all(theirs.get(key) == entity for key, entity in own.entities.items())


def forgotten(bridge: Bridge, case: Case) -> bool:
    assert case.config is not None
    assert bridge.sources.homeassistant is not None
    topic = case.config[0]
    return not any(
        key == topic or key.startswith(topic + "#") for key in bridge.sources.homeassistant.entities
    )
