"""Decoding and validation under hostile input: no exception escapes, and every input
becomes valid readings or dead letters with a reason of DESIGN.md."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.clock import now_ms
from gateway.domain.pending import PendingBook
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.sources import parse_sources
from gateway.domain.validation import Accepted, Held, Outcome, ReadingValidator, Rejected
from gateway.topics import status_device_id
from schemas import Device, DeviceType, is_device_id
from schemas.reading import MAX_PAYLOAD_BYTES, READING
from tests.hostile import NASTY_TEXT, REASONS, nasty_corpus, payloads

pytestmark = pytest.mark.unit

DEVICE = "thermo-1"
REGISTRY = {
    DEVICE: Device(device_id=DEVICE, type=DeviceType.THERMOSTAT, registered_at=0),
    "plug-1": Device(device_id="plug-1", type=DeviceType.SMART_PLUG, registered_at=0),
}


def validator() -> ReadingValidator:
    return ReadingValidator(
        REGISTRY.get,
        require_registration=True,
        max_age_ms=7 * 24 * 3600 * 1000,
        limiter=RateLimiter(100.0, 50),
        clock=lambda: 0.0,
    )


def judge(topic: str, payload: bytes) -> list[Outcome]:
    """The outcomes, checked against the contract: each a canonical reading of the topic's
    device, or a dead letter with a reason of DESIGN.md, a short detail and bounded bytes;
    a status of a device neither registered nor pending is counted and left."""
    judged = validator()
    outcomes = judged.process(topic, payload, now_ms())
    if not outcomes:
        assert status_device_id(topic) is not None, "a reading must yield an outcome"
        assert sum(judged.take_counts()[2].values()) == 1, "a status left is counted"
    for outcome in outcomes:
        if isinstance(outcome, Accepted):
            record = json.loads(outcome.value)
            assert record["device_id"] == topic.split("/")[1] == outcome.device_id
            assert set(record) == {"device_id", "type", "ts", "seq", "metrics", "received_at"}
            READING.validate_python(
                {k: record[k] for k in ("device_id", "type", "ts", "seq", "metrics")}
            )
        else:
            assert isinstance(outcome, Rejected)
            assert outcome.reason.value in REASONS
            assert 0 < len(outcome.detail) <= 300
            assert "\n" not in outcome.detail or outcome.reason.value in ("malformed", "schema")
            assert len(outcome.original) <= MAX_PAYLOAD_BYTES
    return outcomes


@settings(
    max_examples=10_000, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
@given(
    topic=st.one_of(
        st.just(f"devices/{DEVICE}/telemetry"),
        st.sampled_from(["devices/plug-1/telemetry", "devices/ghost/telemetry"]),
        st.builds("devices/{}/telemetry".format, st.sampled_from(NASTY_TEXT)),
        st.text(max_size=40),
    ),
    payload=payloads(DEVICE),
)
def test_any_payload_becomes_readings_or_dead_letters(topic: str, payload: bytes) -> None:
    """10,000 generated messages: random bytes, any JSON, reading-like objects with any part
    wrong (NaN, infinities, huge and negative numbers, text for numbers, unknown fields,
    control and unicode characters in ids), batches of them, truncated encodings."""
    judge(topic, payload)


@pytest.mark.parametrize(
    ("name", "payload"), nasty_corpus(DEVICE), ids=[name for name, _ in nasty_corpus(DEVICE)]
)
def test_nasty_corpus_becomes_dead_letters(name: str, payload: bytes) -> None:
    """Every case of the corpus is refused with a reason; a large batch is refused whole
    (too large), never parsed element by element."""
    outcomes = judge(f"devices/{DEVICE}/telemetry", payload)
    reasons = [o.reason.value for o in outcomes if isinstance(o, Rejected)]
    assert len(reasons) == len(outcomes), name
    if len(payload) > MAX_PAYLOAD_BYTES:
        assert reasons == ["too_large"]


def test_a_valid_reading_still_passes_beside_the_corpus() -> None:
    """The property test's oracle accepts good readings (it would be vacuous otherwise)."""
    good = {"type": "thermostat", "ts": now_ms(), "seq": 1, "metrics": {"temperature_c": 20.0}}
    [outcome] = judge(f"devices/{DEVICE}/telemetry", json.dumps(good).encode())
    assert isinstance(outcome, Accepted)


SOURCES = parse_sources(
    "sources: [{adapter: zigbee2mqtt}, {adapter: tasmota}, {adapter: shelly},"
    " {adapter: homeassistant}]"
)
SOURCE_REGISTRY = {
    name: Device(device_id=name, type=kind, registered_at=0, tz="Europe/Berlin")
    for name, kind in (("room", "climate"), ("plug", "smart_plug"), ("ht", "climate"))
}
# The discovery config of an entity reading a JSON state, so states are decoded as such.
assert SOURCES.homeassistant is not None
SOURCES.homeassistant.learn(
    "homeassistant/sensor/room/t/config",
    b'{"dev_cla":"temperature","stat_t":"home/room","val_tpl":"{{ value_json.t }}",'
    b'"unit_of_meas":"\\u00b0F","dev":{"ids":["room"]}}',
)
SOURCE_TOPICS = [
    "zigbee2mqtt/room", "tele/plug/SENSOR", "tele/plug/STATE", "stat/plug/POWER",
    "ht/events/rpc", "home/room", "zigbee2mqtt/bridge/state", "zigbee2mqtt/\u00e9/x",
]  # fmt: skip
_DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
# Objects with the fields the adapters read, holding anything.
_FIELDS = st.sampled_from([
    "temperature", "contact", "state", "running_state", "last_seen", "illuminance", "Time",
    "ENERGY", "AM2301", "TempUnit", "PressureUnit", "POWER", "method", "params", "t",
])  # fmt: skip


def source_validator(registry: dict[str, Device], **options: Any) -> ReadingValidator:
    """A validator of the sources' messages (their examples are years old: any age goes)."""
    return ReadingValidator(
        registry.get,
        require_registration=True,
        max_age_ms=100 * 365 * 24 * 3600 * 1000,
        limiter=RateLimiter(100.0, 50),
        clock=lambda: 0.0,
        sources=SOURCES,
        **options,
    )


@settings(
    max_examples=3_000, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
@given(
    topic=st.sampled_from(SOURCE_TOPICS),
    payload=st.one_of(
        st.binary(max_size=200),
        _DOCUMENTS.map(lambda d: json.dumps(d, allow_nan=True).encode()),
        st.dictionaries(_FIELDS, _DOCUMENTS, max_size=5).map(
            lambda d: json.dumps(d, allow_nan=True).encode()
        ),
        st.fixed_dictionaries(
            {"method": st.sampled_from(["NotifyStatus", "NotifyFullStatus"]),
             "params": st.dictionaries(st.sampled_from(["ts", "switch:0", "temperature:0"]),
                                       _DOCUMENTS, max_size=3)}
        ).map(lambda d: json.dumps(d, allow_nan=True).encode()),
    ),
)  # fmt: skip
def test_any_message_of_a_device_source_becomes_readings_dead_letters_or_nothing(
    topic: str, payload: bytes
) -> None:
    """3,000 generated messages on the sources' topics: no exception escapes; each gives
    valid readings of its device's type, dead letters with a reason, or nothing; held for
    approval instead when the device is unknown and its source holds."""
    for outcome in source_validator(SOURCE_REGISTRY).process(topic, payload, now_ms()):
        if isinstance(outcome, Accepted):
            record = json.loads(outcome.value)
            kind = SOURCE_REGISTRY[record["device_id"]].type
            READING.validate_python(
                {"type": kind, "ts": record["ts"], "metrics": record["metrics"]}
            )
        else:
            assert isinstance(outcome, Rejected)
            assert outcome.reason.value in REASONS
            assert 0 < len(outcome.detail) <= 300
    holding = source_validator({}, pending=PendingBook(), unknown_devices="hold")
    for outcome in holding.process(topic, payload, now_ms()):
        if isinstance(outcome, Held):
            assert is_device_id(outcome.device_id)
            assert outcome.original == payload
        else:
            assert isinstance(outcome, Rejected), outcome
            assert outcome.reason.value in REASONS
