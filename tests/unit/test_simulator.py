"""The simulated fleet: believable signals within the contract, and faults that produce
exactly the dead-letter reasons DESIGN.md names."""

from __future__ import annotations

import json
import random

import pytest
from gmqtt import Message
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.package import PublishPacket
from gmqtt.mqtt.utils import IdGenerator
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.domain.ratelimit import RateLimiter
from gateway.domain.validation import Accepted, ReadingValidator, Rejected
from schemas import DeviceType
from schemas.reading import READING
from simulators.fleet import FAULTS, FleetTraffic, build_fleet, parse_faults
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
                {"type": device_type.value, "ts": int(now * 1000), "seq": 1, "metrics": metrics}
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
    message = Message("devices/thermo-1/telemetry", payload, qos=1, message_expiry_interval=60)
    _, packet = PublishPacket.build_package(message, Protocol)
    assert _topic_and_payload(packet) == ("devices/thermo-1/telemetry", payload)
