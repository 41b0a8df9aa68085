"""The simulated fleet: believable signals within the contract, faults that produce
exactly the dead-letter reasons DESIGN.md names, the payloads of Zigbee2MQTT, Tasmota and
Shelly devices in their documented fields and units, and how the audit finds each reading."""

from __future__ import annotations

import itertools
import json
import random
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from gmqtt import Message as MqttMessage
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.package import PublishPacket
from gmqtt.mqtt.utils import IdGenerator
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.domain.ratelimit import RateLimiter
from gateway.domain.sources import device_id_of, load_sources
from gateway.domain.validation import Accepted, ReadingValidator, Rejected
from schemas import DeviceType
from schemas.reading import READING
from schemas.types import BUILTIN_CATALOGUE, parse_types
from simulators.audit import SendLog, entry_key, reading_key
from simulators.demo import DEMO_SOURCES, paired_sensor
from simulators.fleet import (
    ENVELOPE_ONLY_FAULTS,
    FAULTS,
    FLEET_FORMATS,
    MIXED_HOME,
    FleetTraffic,
    Message,
    SimDevice,
    build_fleet,
    check_types,
    digest,
    parse_faults,
)
from simulators.formats import (
    FORMAT_TYPES,
    Firmware,
    Format,
    shelly,
    tasmota_time,
)
from simulators.models import MODELS
from simulators.simulate import _topic_and_payload

pytestmark = pytest.mark.unit

DAY_START = 1_795_651_200.0  # 2026-11-26T00:00:00Z


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), start=st.floats(0, 86_400), step=st.floats(0.1, 600))
def test_every_model_stays_in_range_and_passes_the_schema(
    seed: int, start: float, step: float
) -> None:
    """Whatever the seed and the hour, each type's readings validate against its model."""
    for device_type, model_class in MODELS.items():
        model = model_class(random.Random(seed))
        now = DAY_START + start
        for _ in range(150):
            now += step
            metrics = model.step(now, step)
            READING.validate_python(
                {"type": device_type, "ts": int(now * 1000), "seq": 1, "metrics": metrics}
            )


def test_signals_follow_the_day() -> None:
    """Motion sensors see more light at noon than at midnight; CO2 stays above outdoor air."""
    lux = MODELS[DeviceType.MOTION](random.Random(1))
    noon = lux.step(DAY_START + 12 * 3600, 10)["lux"]
    midnight = lux.step(DAY_START + 24 * 3600, 10)["lux"]
    assert noon > 10_000 > midnight
    air = MODELS[DeviceType.AIR_QUALITY](random.Random(2))
    levels = [air.step(DAY_START + 18 * 3600 + i * 60, 60)["co2_ppm"] for i in range(200)]
    assert min(levels) > 380


def test_same_seed_same_fleet_and_readings() -> None:
    """--seed makes a run reproducible."""

    def run(seed: int) -> list[bytes]:
        traffic = FleetTraffic(build_fleet(10, seed), {}, seed)
        return [m.payload for d in traffic.devices for m in traffic.messages(d, DAY_START + 3600)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_fleet_spreads_over_sites_rooms_and_types() -> None:
    """A fleet of 60 has every device type, several sites and rooms, unique valid ids."""
    fleet = build_fleet(60, 1)
    assert {d.type for d in fleet} == set(DeviceType)
    assert len({d.site for d in fleet}) >= 5
    assert len({d.room for d in fleet}) >= 5
    assert len({d.device_id for d in fleet}) == 60


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_gives_the_reason_the_contract_names(fault: str) -> None:
    """Through the bridge's own validation, each fault kind ends as its dead-letter reason;
    duplicates, out-of-order readings and bursts stay valid; offline devices send nothing."""
    fleet = build_fleet(5, 3)
    registry = {d.device_id: d.record() for d in fleet}
    validator = ReadingValidator(
        registry.get,
        require_registration=True,
        max_age_ms=86_400_000,
        limiter=RateLimiter(1e9, 1e9),
    )
    traffic = FleetTraffic(fleet, {fault: 1.0}, 3, first_seq=100)
    now = DAY_START + 10 * 3600
    messages = traffic.messages(fleet[0], now)
    outcomes = [
        o for m in messages for o in validator.process(m.topic, m.payload, int(now * 1000) + 10)
    ]
    expected = FAULTS[fault]
    if fault == "offline":
        assert messages == []
        return
    assert outcomes
    if expected is None:
        assert all(isinstance(o, Accepted) for o in outcomes)
    else:
        assert [o.reason.value for o in outcomes if isinstance(o, Rejected)] == [expected]
    logged = [r for m in messages for r in m.readings]
    assert any(r.fault == fault for r in logged)


def test_out_of_order_and_duplicates_are_logged_as_sent() -> None:
    """The log says exactly what went out: the late reading of a swap, the second copy."""
    fleet = build_fleet(1, 1)
    swapped = FleetTraffic(fleet, {"out_of_order": 1.0}, 1, first_seq=10).messages(
        fleet[0], DAY_START
    )
    assert [r.seq for m in swapped for r in m.readings] == [11, 10]
    fleet = build_fleet(1, 1)
    twice = FleetTraffic(fleet, {"duplicate": 1.0}, 1, first_seq=10).messages(fleet[0], DAY_START)
    assert [(r.seq, r.fault) for m in twice for r in m.readings] == [(10, None), (10, "duplicate")]
    assert twice[0].payload == twice[1].payload


def test_batches_carry_several_readings() -> None:
    """With a batch size, a message is an array of readings with increasing seq."""
    fleet = build_fleet(1, 1)
    [message] = FleetTraffic(fleet, {}, 1, batch_size=5).messages(fleet[0], DAY_START)
    readings = json.loads(message.payload)
    assert [r["seq"] for r in readings] == [0, 1, 2, 3, 4]
    assert len({r["ts"] for r in readings}) == 5


def test_a_device_paired_mid_run_is_silent_until_it_joins_and_then_makes_no_fault() -> None:
    """The demo's paired sensor: nothing before its `joins_at`, then a valid reading at
    every turn (every fault switched on for the fleet), routed by the demo's sources to
    its IEEE address as device id, on a source that holds unknown devices."""
    sensor = paired_sensor(DAY_START + 60, BUILTIN_CATALOGUE)
    traffic = FleetTraffic([sensor], dict.fromkeys(FAULTS, 1.0), 1)
    assert traffic.messages(sensor, DAY_START + 59) == []
    sources = load_sources(DEMO_SOURCES)
    for step in range(20):
        [message] = traffic.messages(sensor, DAY_START + 60 + step)
        [sent] = message.readings
        assert sent.fault is None
        route = sources.route(message.topic)
        assert route is not None
        assert route[1] == sent.device_id == sensor.device_id
    assert re.fullmatch(r"0x00158d00[0-9a-f]{8}", sensor.device_id)
    assert sources.policies["zigbee2mqtt"] == ("hold", False)


def test_fault_spec_is_checked() -> None:
    """Unknown kinds and rates outside 0..1 are refused with a one-line reason."""
    assert parse_faults("malformed=0.1, duplicate=0") == {"malformed": 0.1, "duplicate": 0.0}
    for bad in ("nonsense=0.1", "malformed=2", "malformed", "schema=x"):
        with pytest.raises(ValueError, match="fault"):
            parse_faults(bad)


def test_a_stored_publish_packet_gives_back_its_topic_and_payload() -> None:
    """The simulator re-publishes readings a lost session dropped: it reads them back from
    gmqtt's stored PUBLISH packets (MQTT 5, QoS 1, with properties and a long payload)."""

    class Protocol:
        proto_ver = MQTTv50
        id_generator = IdGenerator()

    payload = b'{"type":"thermostat","ts":1,"metrics":{"temperature_c":21.5}}' * 40
    message = MqttMessage("devices/thermo-1/telemetry", payload, qos=1, message_expiry_interval=60)
    _, packet = PublishPacket.build_package(message, Protocol)
    assert _topic_and_payload(packet) == ("devices/thermo-1/telemetry", payload)


# What the bridge does with each format, as DESIGN.md's table and the README say
# it, written out here on its own so that the simulator's payloads are checked against
# the documented mapping, not against themselves.
_Z2M_FIELDS = {
    "temperature": "temperature_c",
    "local_temperature": "temperature_c",
    "humidity": "humidity_pct",
    "pressure": "pressure_hpa",
    "battery": "battery_pct",
    "occupancy": "motion",
    "power": "power_w",
    "voltage": "voltage_v",
    "current": "current_a",
    "energy": "energy_kwh",
    "occupied_heating_setpoint": "setpoint_c",
    "co2": "co2_ppm",
    "pm25": "pm2_5_ugm3",
    "voc_index": "voc_index",
}
_ENERGY_FIELDS = {"Power": "power_w", "Voltage": "voltage_v", "Current": "current_a",
                  "Total": "energy_kwh"}  # fmt: skip
BERLIN = "Europe/Berlin"


def _z2m(topic: str, state: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    metrics = {_Z2M_FIELDS[k]: v for k, v in state.items() if k in _Z2M_FIELDS}
    lux = state.get("illuminance_lux", state.get("illuminance"))
    if lux is not None:
        metrics["lux"] = lux
    if "contact" in state:
        metrics["open"] = not state["contact"]
    if "state" in state:
        assert state["state"] in ("ON", "OFF")
        metrics["on"] = state["state"] == "ON"
    if "running_state" in state:
        metrics["heating"] = state["running_state"] == "heat"
    assert isinstance(state["last_seen"], int)
    return topic.split("/", 1)[1], state["last_seen"], metrics


def _local_ms(text: str, tz: str) -> int:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(tz))
    return round(moment.timestamp() * 1000)


def _tasmota(topic: str, document: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    prefix, name, kind = topic.split("/")
    assert prefix == "tele"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d([+-]\d\d:\d\d)?", document["Time"])
    metrics: dict[str, Any] = {}
    if kind == "STATE":
        metrics["on"] = {"ON": True, "OFF": False}[document["POWER"]]
    else:
        assert kind == "SENSOR"
        for field, metric in _ENERGY_FIELDS.items():
            if field in document.get("ENERGY", {}):
                metrics[metric] = document["ENERGY"][field]
        for key, block in document.items():
            if key == "ENERGY" or not isinstance(block, dict):
                continue
            if "Temperature" in block and "temperature_c" not in metrics:
                celsius = block["Temperature"]
                if document["TempUnit"] == "F":
                    celsius = (celsius - 32) * 5 / 9
                metrics["temperature_c"] = celsius
            if "Humidity" in block:
                metrics.setdefault("humidity_pct", block["Humidity"])
            if "Pressure" in block and document.get("PressureUnit", "hPa") == "hPa":
                metrics.setdefault("pressure_hpa", block["Pressure"])
    return name, _local_ms(document["Time"], BERLIN), metrics


def _shelly(topic: str, document: dict[str, Any]) -> tuple[str, int, dict[str, Any]]:
    name, events, rpc = topic.split("/")
    assert (events, rpc) == ("events", "rpc")
    assert document["method"] in ("NotifyStatus", "NotifyFullStatus")
    params = document["params"]
    assert isinstance(params["ts"], float)  # seconds
    metrics: dict[str, Any] = {}
    switch = params.get("switch:0", {})
    for field, metric in (("output", "on"), ("apower", "power_w"), ("voltage", "voltage_v"),
                          ("current", "current_a")):  # fmt: skip
        if field in switch:
            metrics[metric] = switch[field]
    if "aenergy" in switch:
        metrics["energy_kwh"] = switch["aenergy"]["total"] / 1000  # Wh
    if "temperature:0" in params:
        metrics["temperature_c"] = params["temperature:0"]["tC"]
    if "humidity:0" in params:
        metrics["humidity_pct"] = params["humidity:0"]["rh"]
    if "devicepower:0" in params:
        metrics["battery_pct"] = params["devicepower:0"]["battery"]["percent"]
    return name, round(params["ts"] * 1000), metrics


def bridge_view(message: Message, device_type: str) -> dict[str, Any]:
    """The canonical reading the bridge makes of a device's message (metrics filtered to
    its type's), as `iot.readings` holds it."""
    document = json.loads(message.payload)
    if message.topic.startswith("zigbee2mqtt/"):
        native, ts, metrics = _z2m(message.topic, document)
    elif message.topic.startswith("tele/"):
        native, ts, metrics = _tasmota(message.topic, document)
    else:
        native, ts, metrics = _shelly(message.topic, document)
    kept = {k: v for k, v in metrics.items() if k in BUILTIN_CATALOGUE.metric_names(device_type)}
    device_id = re.sub(r"[^A-Za-z0-9_-]", "_", native)
    return {"device_id": device_id, "type": device_type, "ts": ts, "seq": None,
            "metrics": kept, "received_at": ts + 5}  # fmt: skip


SOURCE_FORMATS = [Format.ZIGBEE2MQTT, Format.TASMOTA, Format.SHELLY]


def test_each_format_plays_only_its_types() -> None:
    """A fleet of one format has the types that format's devices have; no other type."""
    for fmt in Format:
        fleet = build_fleet(24, 1, fmt)
        assert {d.type for d in fleet} == set(FORMAT_TYPES[fmt])
        assert {d.format for d in fleet} == {fmt}
    assert set(FORMAT_TYPES[Format.TASMOTA]) == {DeviceType.SMART_PLUG, DeviceType.CLIMATE}
    assert set(FORMAT_TYPES[Format.ZIGBEE2MQTT]) == set(DeviceType)
    motion = MODELS[DeviceType.MOTION](random.Random(1))
    with pytest.raises(ValueError, match="does not play"):
        SimDevice("tasmota_0A0B0C", DeviceType.MOTION, "s", "r", motion,
                  Firmware(Format.TASMOTA, "tasmota_0A0B0C"))  # fmt: skip


def test_mixed_fleet_is_a_home_of_every_format() -> None:
    """`mixed`: Zigbee climate, motion and door sensors, Tasmota and Shelly plugs, envelope
    devices; a fleet of 50 has every format and every type."""
    home = {(fmt, t) for fmt, t in MIXED_HOME}
    zigbee = {t for fmt, t in home if fmt is Format.ZIGBEE2MQTT}
    assert {DeviceType.CLIMATE, DeviceType.MOTION, DeviceType.CONTACT} <= zigbee
    assert (Format.TASMOTA, DeviceType.SMART_PLUG) in home
    assert (Format.SHELLY, DeviceType.SMART_PLUG) in home
    fleet = build_fleet(50, 1, "mixed")
    assert {d.format for d in fleet} == set(Format)
    assert {d.type for d in fleet} == set(DeviceType)
    assert "mixed" in FLEET_FORMATS
    with pytest.raises(ValueError, match="unknown format"):
        build_fleet(5, 1, "homie")


@pytest.mark.parametrize("fmt", SOURCE_FORMATS)
def test_source_payloads_map_to_the_models_metrics(fmt: Format) -> None:
    """Through the documented mapping, each message of a Zigbee2MQTT, Tasmota or Shelly
    device gives its device id, its time and the metrics its model produced, in the
    canonical units, valid for its type."""
    fleet, twins = build_fleet(12, 4, fmt), build_fleet(12, 4, fmt)
    traffic = FleetTraffic(fleet, {}, 4)
    last: dict[str, float] = {}
    seen = set()
    for step in range(200):
        now = DAY_START + 7 * 3600 + step * 37.3
        for device, twin in zip(fleet, twins, strict=True):
            messages = traffic.messages(device, now)
            if not messages:
                continue
            expected = twin.model.step(now, now - last[device.device_id] if device.device_id
                                       in last else 10.0)  # fmt: skip
            last[device.device_id] = now
            [message] = messages
            [sent] = message.readings
            reading = bridge_view(message, device.type)
            assert reading["device_id"] == sent.device_id == device.device_id
            assert reading["ts"] == sent.ts
            assert abs(reading["ts"] - now * 1000) < 1000
            metrics = reading["metrics"]
            assert metrics, message
            BUILTIN_CATALOGUE.metrics_adapter(device.type).validate_python(metrics)
            for name, value in metrics.items():
                if isinstance(value, bool):
                    assert value is expected[name], (name, message)
                else:  # the firmware's rounding (whole watts, 0.1 °F ...), not a unit
                    assert value == pytest.approx(expected[name], abs=0.51), (name, message)
            seen.add((device.type, frozenset(metrics)))
    assert {t for t, _ in seen} == set(FORMAT_TYPES[fmt])


def test_zigbee2mqtt_states_have_the_documented_fields() -> None:
    """`zigbee2mqtt/<friendly name>`: each device's whole state in Zigbee2MQTT's fields
    (battery sensors' `voltage` in millivolts, `contact: true` when closed, plugs' `state`
    ON/OFF, lux in `illuminance` or, 1.x, `illuminance_lux`), `last_seen` in epoch ms."""
    fleet = build_fleet(12, 2, "zigbee2mqtt")
    traffic = FleetTraffic(fleet, {}, 2)
    now = DAY_START + 19 * 3600.25
    fields: dict[str, set[str]] = {
        DeviceType.CLIMATE: {"battery", "humidity", "pressure", "temperature", "voltage"},
        DeviceType.CONTACT: {
            "battery",
            "contact",
            "device_temperature",
            "power_outage_count",
            "voltage",
        },
        DeviceType.MOTION: {
            "battery",
            "device_temperature",
            "illuminance",
            "occupancy",
            "power_outage_count",
            "voltage",
        },
        DeviceType.SMART_PLUG: {
            "child_lock",
            "current",
            "energy",
            "indicator_mode",
            "power",
            "power_outage_memory",
            "state",
            "voltage",
        },
        DeviceType.THERMOSTAT: {
            "battery",
            "local_temperature",
            "occupied_heating_setpoint",
            "running_state",
            "system_mode",
        },
        DeviceType.AIR_QUALITY: {"co2", "humidity", "pm25", "temperature", "voc_index"},
    }
    for device in fleet:
        [message] = traffic.messages(device, now)
        assert message.topic == f"zigbee2mqtt/{device.firmware.native_id}"
        state = json.loads(message.payload)
        assert state["last_seen"] == int(now * 1000)
        assert 0 <= state["linkquality"] <= 255
        own = set(state) - {"last_seen", "linkquality", "illuminance_lux"}
        assert own == fields[device.type]
        if device.type in (DeviceType.CLIMATE, DeviceType.CONTACT, DeviceType.MOTION):
            assert 2600 < state["voltage"] < 3100  # millivolts of a CR2032
            assert isinstance(state["battery"], int)
        if device.type is DeviceType.SMART_PLUG:
            assert state["state"] in ("ON", "OFF")
            assert 200 < state["voltage"] < 260  # volts
        if device.type is DeviceType.MOTION and device.firmware.z2m_v1:
            assert state["illuminance_lux"] <= state["illuminance"]  # 1.x: raw and lux
    contact = next(d for d in fleet if d.type is DeviceType.CONTACT)
    for step in range(1, 200):
        state = json.loads(traffic.messages(contact, now + step * 30)[0].payload)
        assert state["contact"] is not contact.model.open  # type: ignore[attr-defined]


def test_tasmota_time_is_local_without_offset_unless_set_option52() -> None:
    """`Time` is the device's local time (here Berlin) in whole seconds, without an
    offset; with SetOption52, or in the hour the clocks go back, with one."""
    plain = Firmware(Format.TASMOTA, "tasmota_1A2B3C", tz=BERLIN)
    option52 = Firmware(Format.TASMOTA, "tasmota_1A2B3C", tz=BERLIN, set_option52=True)

    def ms(text: str) -> int:
        return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)

    assert tasmota_time(plain, ms("2026-11-26T07:00:00.789")) == "2026-11-26T08:00:00"
    assert tasmota_time(plain, ms("2026-07-01T07:00:00")) == "2026-07-01T09:00:00"
    assert tasmota_time(option52, ms("2026-11-26T07:00:00")) == "2026-11-26T08:00:00+01:00"
    # 25 October 2026: 02:30 happens at 00:30 and at 01:30 UTC.
    assert tasmota_time(plain, ms("2026-10-25T00:30:00")) == "2026-10-25T02:30:00+02:00"
    assert tasmota_time(plain, ms("2026-10-25T01:30:00")) == "2026-10-25T02:30:00+01:00"
    assert tasmota_time(plain, ms("2026-10-25T02:30:00")) == "2026-10-25T03:30:00"
    utc = Firmware(Format.TASMOTA, "tasmota_1A2B3C")
    assert tasmota_time(utc, ms("2026-11-26T07:00:00")) == "2026-11-26T07:00:00"


def test_tasmota_device_sends_at_most_one_reading_a_second() -> None:
    """Stepped four times a second, a Tasmota device sends once a second: its `Time` has
    whole seconds, and two readings with one time would be one key and one point."""
    fleet = build_fleet(2, 1, "tasmota")
    traffic = FleetTraffic(fleet, {}, 1)
    times = []
    for step in range(40):
        for message in traffic.messages(fleet[1], DAY_START + 0.1 + step * 0.25):
            times.append(message.readings[0].ts)
    assert len(times) == 10
    assert times == sorted(set(times))
    assert all(isinstance(t, int) and t % 1000 == 0 for t in times)


def test_tasmota_plug_reports_its_relay_in_state_and_energy_in_sensor() -> None:
    """A plug's relay goes out in `tele/<topic>/STATE` (`POWER` ON/OFF) when it changed,
    its energy monitor in `tele/<topic>/SENSOR` (`ENERGY`: W, V, A, kWh)."""
    [plug] = [d for d in build_fleet(2, 3, "tasmota") if d.type is DeviceType.SMART_PLUG]
    traffic = FleetTraffic([plug], {}, 3)
    kinds: dict[str, list[dict[str, Any]]] = {"STATE": [], "SENSOR": []}
    for step in range(400):
        for message in traffic.messages(plug, DAY_START + 6 * 3600 + step * 20):
            kinds[message.topic.rsplit("/", 1)[1]].append(json.loads(message.payload))
    assert kinds["STATE"]
    assert kinds["SENSOR"]
    powers = [s["POWER"] for s in kinds["STATE"]]
    assert all(a != b for a, b in itertools.pairwise(powers))  # changes only
    energy = kinds["SENSOR"][0]["ENERGY"]
    assert {"Total", "Power", "Voltage", "Current", "Factor", "Today"} <= set(energy)
    assert 200 < energy["Voltage"] < 260
    assert isinstance(energy["Power"], int)
    totals = [s["ENERGY"]["Total"] for s in kinds["SENSOR"]]
    assert totals == sorted(totals)


def test_tasmota_climate_block_names_its_units() -> None:
    """A climate board's block is its sensor's (AM2301, BME280 with `Pressure` and
    `PressureUnit`), with `TempUnit`; a device set to °F sends Fahrenheit."""
    fleet = [d for d in build_fleet(80, 5, "tasmota") if d.type is DeviceType.CLIMATE]
    traffic = FleetTraffic(fleet, {}, 5)
    units = set()
    for device in fleet:
        [message] = traffic.messages(device, DAY_START + 12 * 3600)
        document = json.loads(message.payload)
        block = document[device.firmware.sensor]
        units.add((device.firmware.sensor, document["TempUnit"]))
        assert document["TempUnit"] == device.firmware.temp_unit
        low, high = (50, 80) if document["TempUnit"] == "F" else (10, 27)
        assert low < block["Temperature"] < high
        assert ("Pressure" in block) == (device.firmware.sensor == "BME280")
        assert ("PressureUnit" in document) == (device.firmware.sensor == "BME280")
    assert units == {("AM2301", "C"), ("AM2301", "F"), ("BME280", "C"), ("BME280", "F")}


@settings(max_examples=200, deadline=None)
@given(ts_ms=st.integers(1_500_000_000_000, 4_000_000_000_000))
def test_shelly_ts_is_seconds_that_give_back_the_milliseconds(ts_ms: int) -> None:
    """`params.ts` is epoch seconds with the milliseconds as a fraction; rounded to ms
    after JSON it is the device time exactly."""
    firmware = Firmware(Format.SHELLY, "shellyplusplugs-441793d69718")
    metrics = MODELS[DeviceType.SMART_PLUG](random.Random(1)).step(ts_ms / 1000, 10)
    _, document = shelly(firmware, DeviceType.SMART_PLUG, metrics, ts_ms)
    params = json.loads(json.dumps(document))["params"]
    assert isinstance(params["ts"], float)
    assert round(params["ts"] * 1000) == ts_ms


def test_shelly_messages_are_notify_status_with_energy_in_wh() -> None:
    """A Plus Plug S sends `NotifyStatus` with `switch:0` (W, V, A, `aenergy.total` in Wh);
    a Plus H&T `NotifyFullStatus` with temperature:0, humidity:0 and devicepower:0."""
    fleet = build_fleet(2, 6, "shelly")
    twins = build_fleet(2, 6, "shelly")
    traffic = FleetTraffic(fleet, {}, 6)
    now = DAY_START + 8 * 3600.123
    for device, twin in zip(fleet, twins, strict=True):
        [message] = traffic.messages(device, now)
        expected = twin.model.step(now, 10.0)
        document = json.loads(message.payload)
        assert message.topic == f"{device.device_id}/events/rpc"
        assert document["src"] == device.device_id
        params = document["params"]
        if device.type is DeviceType.SMART_PLUG:
            assert re.fullmatch(r"shellyplusplugs-[0-9a-f]{12}", device.device_id)
            assert document["method"] == "NotifyStatus"
            switch = params["switch:0"]
            assert switch["aenergy"]["total"] == pytest.approx(expected["energy_kwh"] * 1000)
            assert switch["output"] is expected["on"]
            assert switch["apower"] == expected["power_w"]
        else:
            assert re.fullmatch(r"shellyplusht-[0-9a-f]{12}", device.device_id)
            assert document["method"] == "NotifyFullStatus"
            assert params["temperature:0"]["tC"] == pytest.approx(
                expected["temperature_c"], abs=0.05
            )
            assert params["humidity:0"]["rh"] == pytest.approx(expected["humidity_pct"], abs=0.05)
            assert params["devicepower:0"]["battery"]["percent"] == round(expected["battery_pct"])


def test_device_ids_are_what_the_bridge_derives_and_the_fleet_registers() -> None:
    """Each device id is its native id with characters outside [A-Za-z0-9_-] made `_`:
    Zigbee2MQTT friendly names grouped by room, Tasmota's `tasmota_XXXXXX`, Shelly ids; the
    registry records carry those ids, and a Tasmota device's clock zone."""
    fleet = build_fleet(200, 9, "mixed")
    assert len({d.device_id for d in fleet}) == 200
    for device in fleet:
        native = device.firmware.native_id
        assert device.device_id == device_id_of(native) == re.sub(r"[^\w-]", "_", native)
        record = device.record()
        assert record.device_id == device.device_id
        assert record.type == device.type
        if device.format is Format.ZIGBEE2MQTT:
            assert native.count("/") == 2
            assert device.device_id == native.replace("/", "_")
        elif device.format is Format.TASMOTA:
            assert re.fullmatch(r"tasmota_[0-9A-F]{6}", native)
            assert record.tz == BERLIN
        elif device.format is Format.SHELLY:
            assert re.fullmatch(r"shellyplus(plugs|ht)-[0-9a-f]{12}", native)
        if device.format is not Format.TASMOTA:
            assert record.tz is None


@pytest.mark.parametrize("fmt", SOURCE_FORMATS)
@pytest.mark.parametrize("fault", sorted(set(FAULTS) - ENVELOPE_ONLY_FAULTS))
def test_each_fault_is_made_in_every_source_format(fmt: Format, fault: str) -> None:
    """malformed: cut JSON; schema: a value out of its type's range; unknown_device: an id
    nobody registered; clock_skew: the device time an hour ahead; oversize: over 64 KiB;
    duplicate, out_of_order, burst: valid and logged as sent; offline: nothing."""
    fleet = build_fleet(4, 3, fmt)
    now = DAY_START + 10 * 3600
    for device in fleet:
        traffic = FleetTraffic([device], {fault: 1.0}, 3)
        messages = traffic.messages(device, now)
        logged = [r for m in messages for r in m.readings]
        if fault == "offline":
            assert messages == []
            continue
        assert logged
        assert {r.format for r in logged} == {fmt}
        assert all(r.digest == digest(m.payload) for m in messages for r in m.readings)
        if fault == "malformed":
            with pytest.raises(json.JSONDecodeError):
                json.loads(messages[0].payload)
            continue
        if fault == "oversize":
            assert len(messages[0].payload) > 64 * 1024
        views = [bridge_view(m, device.type) for m in messages]
        adapter = BUILTIN_CATALOGUE.metrics_adapter(device.type)
        if fault == "schema":
            with pytest.raises(ValidationError, match="less than or equal"):
                adapter.validate_python(views[0]["metrics"])
            continue
        for view in views:
            adapter.validate_python(view["metrics"])
        times = [v["ts"] for v in views]
        assert times == [r.ts for r in logged]
        if fault == "unknown_device":
            assert views[0]["device_id"].startswith("sim-ghost-")
            assert logged[0].device_id == views[0]["device_id"]
        else:
            assert {v["device_id"] for v in views} == {device.device_id}
        if fault == "clock_skew":
            assert times[0] > now * 1000 + 3_500_000
        elif fault == "out_of_order":
            assert times[0] > times[1]
        elif fault == "burst":
            assert times == sorted(set(times))
            assert len(times) == 20
        elif fault == "duplicate":
            assert messages[0].payload == messages[1].payload
            assert [r.fault for r in logged] == [None, "duplicate"]


def test_envelope_only_faults_are_refused_or_skipped_for_other_formats() -> None:
    """A time without an offset is normal in the source formats: `naive_ts` is refused for
    their fleets, and in a mixed fleet only envelope devices make it."""
    for fmt in ("zigbee2mqtt", "tasmota", "shelly"):
        with pytest.raises(ValueError, match="envelope devices"):
            parse_faults("naive_ts=0.1", fmt)
    assert parse_faults("naive_ts=0.1", "mixed") == {"naive_ts": 0.1}
    fleet = build_fleet(10, 1, "mixed")
    traffic = FleetTraffic(fleet, {"naive_ts": 1.0}, 1)
    for device in fleet:
        [message] = traffic.messages(device, DAY_START)
        expected = "naive_ts" if device.format is Format.ENVELOPE else None
        assert message.readings[0].fault == expected


def _play(fleet_format: str, faults: dict[str, float], steps: int) -> list[Message]:
    fleet = build_fleet(20, 8, fleet_format)
    traffic = FleetTraffic(fleet, faults, 8, first_seq=1000)
    messages = []
    for step in range(steps):
        for device in fleet:
            messages += traffic.messages(device, DAY_START + 9 * 3600 + step * 0.3)
    return messages


def test_audit_finds_envelope_readings_by_seq_and_others_by_device_time(
    tmp_path: Path,
) -> None:
    """From the log, each valid reading has one key, none shared with another reading: an
    envelope one its seq, another format's its device time; and the canonical reading the
    bridge makes of it in iot.readings has that same key."""
    faults = {"duplicate": 0.02, "out_of_order": 0.02, "burst": 0.005, "schema": 0.01}
    messages = _play("mixed", faults, 150)
    log = tmp_path / "sent.jsonl"
    log.write_text("".join(r.json_line() + "\n" for m in messages for r in m.readings))
    sent = SendLog.read(log)
    originals = [
        e for e in sent.entries if FAULTS.get(e["fault"]) is None and e["fault"] != "duplicate"
    ]
    assert len(sent.valid) == len(originals) > 2000
    kinds = {key[1] for key in sent.valid}
    assert kinds == {"seq", "ts"}
    fleet = {d.device_id: d for d in build_fleet(20, 8, "mixed")}
    for message in messages:
        [first, *_] = message.readings
        if first.fault == "schema" or first.device_id not in fleet:
            continue
        device = fleet[first.device_id]
        if device.format is Format.ENVELOPE:
            reading = json.loads(message.payload)
            canonical = {**reading, "device_id": device.device_id, "received_at": 1}
        else:
            canonical = bridge_view(message, device.type)
        key = reading_key(json.dumps(canonical).encode())
        assert key in sent.valid
        assert key == entry_key(json.loads(first.json_line()) | {"format": first.format})


def test_audit_recognises_a_dead_letter_by_its_bytes(tmp_path: Path) -> None:
    """A dead letter holds the payload's bytes: their digest leads back to the valid
    readings it carried (say, over a rate limit); a faulty payload's to none."""
    messages = _play("mixed", {"malformed": 0.05, "clock_skew": 0.05}, 20)
    log = tmp_path / "sent.jsonl"
    log.write_text("".join(r.json_line() + "\n" for m in messages for r in m.readings))
    sent = SendLog.read(log)
    by_digest = sent.by_digest
    for message in messages:
        [reading] = message.readings
        keys = by_digest.get(digest(message.payload), set())
        if reading.fault is None:
            assert keys == {entry_key(json.loads(reading.json_line()) | {"format": reading.format})}
        else:
            assert keys == set()


def test_logs_without_formats_are_read_as_envelope_logs(tmp_path: Path) -> None:
    """A log written before the other formats (no format, no digest) audits as before."""
    log = tmp_path / "old.jsonl"
    log.write_text(
        json.dumps({"device_id": "thermo-1", "seq": 7, "ts": 1795680000000, "fault": None}) + "\n"
    )
    sent = SendLog.read(log)
    assert sent.valid == {("thermo-1", "seq", 7)}
    assert sent.by_digest == {}
    assert reading_key(b'{"device_id": "thermo-1", "seq": 7, "ts": 1}') == ("thermo-1", "seq", 7)
    assert reading_key(b'{"device_id": "plug-1", "seq": null, "ts": 5}') == ("plug-1", "ts", 5)
    assert reading_key(b"not json") is None


def test_demo_sources_file_reads_every_message_of_the_mixed_fleet() -> None:
    """Through the bridge's own adapters (configured by the demo's sources file), each
    message of the mixed fleet's Zigbee2MQTT, Tasmota and Shelly devices is routed to its
    device id and decodes to the documented metrics and the device time the audit keys it
    by."""
    sources = load_sources(DEMO_SOURCES)
    fleet = build_fleet(30, 1, "mixed")
    traffic = FleetTraffic(fleet, {}, 1)
    decoded = 0
    for step in range(30):
        for device in fleet:
            for message in traffic.messages(device, DAY_START + 8 * 3600 + step * 1.7):
                [sent] = message.readings
                route = sources.route(message.topic)
                if device.format is Format.ENVELOPE:
                    assert route is None
                    continue
                assert route is not None, message.topic
                adapter, device_id = route
                assert device_id == device.device_id
                readings = adapter.decode(message.topic, message.payload)
                assert readings, message.payload
                expected = bridge_view(message, device.type)["metrics"]
                for reading in readings:
                    assert reading.device_id == device.device_id
                    names = BUILTIN_CATALOGUE.metric_names(device.type)
                    kept = {k: v for k, v in reading.metrics.items() if k in names}
                    assert kept == pytest.approx(expected), message.payload
                    ts = reading.ts
                    if isinstance(ts, datetime):
                        ts = int(ts.replace(tzinfo=ZoneInfo(BERLIN)).timestamp() * 1000)
                    assert ts == sent.ts
                    decoded += 1
    assert decoded > 300


def test_a_user_type_plays_inside_its_ranges_as_our_envelope() -> None:
    """A types-file type gets a generic model: every metric, numbers in range, ints whole,
    bools that flip; its readings pass the bridge's validation of that type."""
    catalogue = parse_types(
        "types:\n  - name: soil_probe\n    metrics:\n"
        "      - {name: moisture, unit: pct, min: 0, max: 100}\n"
        "      - {name: tips, kind: int, min: 0, max: 50}\n"
        "      - {name: leak, kind: bool}\n"
    )
    fleet = build_fleet(4, 3, types=["soil_probe", "climate"], catalogue=catalogue)
    assert [d.type for d in fleet] == ["soil_probe", "climate", "soil_probe", "climate"]
    probe = fleet[0]
    assert probe.format is Format.ENVELOPE
    now, leaks = 1_795_680_000.0, set()
    for _ in range(500):
        now += 60
        metrics = probe.model.step(now, 60)
        catalogue.reading.validate_python(
            {"type": "soil_probe", "ts": int(now * 1000), "metrics": metrics}
        )
        assert 0 <= metrics["moisture_pct"] <= 100
        assert isinstance(metrics["tips"], int)
        assert 0 <= metrics["tips"] <= 50
        leaks.add(metrics["leak"])
    assert leaks == {True, False}


@pytest.mark.parametrize(
    ("types", "fleet_format", "message"),
    [
        (["toaster"], "envelope", "unknown device type 'toaster'"),
        (["soil_probe"], "tasmota", "a tasmota device does not play soil_probe"),
        (["climate"], "mixed", "the mixed home has its own types"),
    ],
)
def test_types_a_fleet_cannot_play_are_refused_in_one_line(
    types: list[str], fleet_format: str, message: str
) -> None:
    """`iotgw simulate --type` names a known type its format can play."""
    catalogue = parse_types("types: [{name: soil_probe, metrics: [{name: leak, kind: bool}]}]")
    with pytest.raises(ValueError, match=message):
        check_types(types, fleet_format, catalogue)
