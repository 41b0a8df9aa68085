"""Validation and normalisation of readings: every reason of DESIGN.md, batches, timestamps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.domain.deadletters import Reason
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.validation import Accepted, Outcome, Presence, ReadingValidator, Rejected
from gateway.topics import telemetry_device_id
from schemas import Device, DeviceType

pytestmark = pytest.mark.unit

NOW = 1_795_680_000_000
TOPIC = "devices/t1/telemetry"
REGISTRY = {
    "t1": Device(device_id="t1", type=DeviceType.THERMOSTAT, registered_at=0, site="home"),
    "off": Device(device_id="off", type=DeviceType.CONTACT, registered_at=0, enabled=False),
    "p1": Device(device_id="p1", type=DeviceType.SMART_PLUG, registered_at=0),
}


def validator(*, registration: bool = True, burst: int = 1000) -> ReadingValidator:
    return ReadingValidator(
        REGISTRY.get,
        require_registration=registration,
        max_age_ms=24 * 3600 * 1000,
        limiter=RateLimiter(1.0, burst),
        clock=lambda: 0.0,
    )


def reading(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "thermostat",
        "ts": NOW - 1000,
        "seq": 7,
        "metrics": {"temperature_c": 21.5, "heating": True},
    }
    return base | overrides


def one(payload: bytes | dict[str, Any], topic: str = TOPIC, **kwargs: Any) -> Outcome:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    [outcome] = validator(**kwargs).process(topic, raw, NOW)
    return outcome


def test_valid_reading_becomes_canonical_json() -> None:
    """The canonical record has the fields of DESIGN.md; an integer for a float stays a float."""
    outcome = one(reading(metrics={"temperature_c": 21, "setpoint_c": 20.5, "heating": False}))
    assert isinstance(outcome, Accepted)
    assert outcome.device_id == "t1"
    assert json.loads(outcome.value) == {
        "device_id": "t1",
        "type": "thermostat",
        "ts": NOW - 1000,
        "seq": 7,
        "metrics": {"temperature_c": 21.0, "setpoint_c": 20.5, "heating": False},
        "received_at": NOW,
    }
    assert b'"temperature_c":21.0' in outcome.value


def test_metrics_sent_as_null_are_left_out_and_no_seq_is_null() -> None:
    """A metric sent as null is not in the canonical record; a reading without seq has null."""
    payload = reading(metrics={"temperature_c": None, "humidity_pct": 40})
    del payload["seq"]
    outcome = one(payload)
    assert isinstance(outcome, Accepted)
    record = json.loads(outcome.value)
    assert record["metrics"] == {"humidity_pct": 40.0}
    assert record["seq"] is None


def test_topic_ids_are_judged_the_same_the_second_time() -> None:
    """A topic seen before gives the same device id, or the same refusal, as the first time."""
    checker = validator()
    for _ in range(2):
        [good] = checker.process(TOPIC, json.dumps(reading()).encode(), NOW)
        [bad] = checker.process("devices/no good/telemetry", b"{}", NOW)
        assert isinstance(good, Accepted)
        assert good.device_id == "t1"
        assert isinstance(bad, Rejected)
        assert bad.reason is Reason.UNKNOWN_DEVICE
        assert bad.device_id is None


@pytest.mark.parametrize(
    ("ts", "epoch_ms"),
    [
        ("2026-11-26T07:00:00.123Z", 1_795_676_400_123),
        ("2026-11-26T08:00:00.123+01:00", 1_795_676_400_123),
        ("2026-11-26 07:00:00Z", 1_795_676_400_000),
        (1_795_676_400_123, 1_795_676_400_123),
    ],
)
def test_timestamps_with_zone_or_epoch_ms_are_accepted(ts: Any, epoch_ms: int) -> None:
    """RFC 3339 with Z or an offset, or epoch milliseconds, all become epoch ms."""
    outcome = ReadingValidator(
        REGISTRY.get, require_registration=True, max_age_ms=10**12, limiter=RateLimiter(1, 10)
    ).process(TOPIC, json.dumps(reading(ts=ts)).encode(), epoch_ms)[0]
    assert isinstance(outcome, Accepted), outcome
    assert json.loads(outcome.value)["ts"] == epoch_ms


@pytest.mark.parametrize(
    "ts", ["2026-11-26T07:00:00", "2026-11-26T07:00:00.5", "2026-11-26", "yesterday", True, -1, 1.5]
)
def test_naive_or_odd_timestamps_are_schema_errors(ts: Any) -> None:
    """A timestamp without a zone is rejected, never guessed; so are other forms."""
    outcome = one(reading(ts=ts))
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.SCHEMA
    assert outcome.detail.startswith("ts")


@pytest.mark.parametrize(
    ("payload", "reason", "topic"),
    [
        (b"{not json", Reason.MALFORMED, TOPIC),
        (b'{"a": "\xff"}', Reason.MALFORMED, TOPIC),
        (b"42", Reason.MALFORMED, TOPIC),
        (b"x" * 70_000, Reason.TOO_LARGE, TOPIC),
        (reading(metrics={"temperature_c": 21, "colour": "red"}), Reason.SCHEMA, TOPIC),
        (reading(metrics={"temperature_c": 99}), Reason.SCHEMA, TOPIC),
        (reading(metrics={"heating": 1}), Reason.SCHEMA, TOPIC),
        (reading(metrics={}), Reason.SCHEMA, TOPIC),
        (reading(type="toaster"), Reason.SCHEMA, TOPIC),
        (reading(seq=-1), Reason.SCHEMA, TOPIC),
        (reading(extra=1), Reason.SCHEMA, TOPIC),
        (reading(device_id="t2"), Reason.ID_MISMATCH, TOPIC),
        (reading(), Reason.UNKNOWN_DEVICE, "devices/ghost/telemetry"),
        (reading(), Reason.UNKNOWN_DEVICE, "devices/bad id/telemetry"),
        (reading(), Reason.UNKNOWN_DEVICE, "elsewhere/t1"),
        (
            reading(type="contact", metrics={"open": True}),
            Reason.DEVICE_DISABLED,
            "devices/off/telemetry",
        ),
        (reading(type="motion", metrics={"motion": True}), Reason.TYPE_MISMATCH, TOPIC),
        (reading(ts=NOW + 6 * 60 * 1000), Reason.CLOCK_SKEW, TOPIC),
        (reading(ts=NOW - 25 * 3600 * 1000), Reason.CLOCK_SKEW, TOPIC),
    ],
)
def test_each_rejection_has_its_reason_and_keeps_the_bytes(
    payload: bytes | dict[str, Any], reason: Reason, topic: str
) -> None:
    """A bad reading becomes one dead letter with the reason of DESIGN.md and its bytes."""
    outcome = one(payload, topic)
    assert isinstance(outcome, Rejected)
    assert outcome.reason is reason, outcome.detail
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    assert outcome.original == raw[:65536]
    assert outcome.detail
    assert "\n" not in outcome.detail
    assert (outcome.mqtt_topic, outcome.received_at) == (topic, NOW)


def test_dead_letter_key_is_the_topic_device_when_valid() -> None:
    """The key is the device id when the topic names a valid one, else none."""
    assert one(b"{", "devices/t1/telemetry").device_id == "t1"
    assert one(b"{", "devices/no good/telemetry").device_id is None


def test_nan_and_infinity_are_refused() -> None:
    """Non-finite numbers are not readings."""
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        payload = b'{"type":"thermostat","ts":%d,"metrics":{"temperature_c":%s}}' % (NOW, literal)
        outcome = one(payload)
        assert isinstance(outcome, Rejected)
        assert outcome.reason in (Reason.SCHEMA, Reason.MALFORMED)


def test_batch_readings_are_judged_one_by_one() -> None:
    """In a batch, valid readings pass and each bad one is its own dead letter."""
    batch = [reading(seq=1), reading(seq=2, metrics={"temperature_c": 500}), 5, reading(seq=3)]
    outcomes = validator().process(TOPIC, json.dumps(batch).encode(), NOW)
    assert [type(o).__name__ for o in outcomes] == ["Accepted", "Rejected", "Rejected", "Accepted"]
    bad = outcomes[1]
    assert isinstance(bad, Rejected)
    assert json.loads(bad.original) == batch[1]
    assert [json.loads(o.value)["seq"] for o in outcomes if isinstance(o, Accepted)] == [1, 3]


def test_empty_batch_is_a_schema_error() -> None:
    """An empty array carries no reading."""
    outcome = one(b"[]")
    assert isinstance(outcome, Rejected)
    assert outcome.reason is Reason.SCHEMA


def test_unregistered_devices_pass_when_registration_is_not_required() -> None:
    """With IOTGW_REQUIRE_REGISTRATION=false an unknown id is accepted."""
    outcome = one(reading(), "devices/newcomer/telemetry", registration=False)
    assert isinstance(outcome, Accepted)


def test_flooding_device_is_rate_limited_alone() -> None:
    """Past its burst a device gets rate_limited; another device is unaffected."""
    limited = validator(burst=3)
    payload = json.dumps(reading()).encode()
    first = [limited.process(TOPIC, payload, NOW)[0] for _ in range(5)]
    assert [type(o).__name__ for o in first] == ["Accepted"] * 3 + ["Rejected"] * 2
    assert isinstance(first[-1], Rejected)
    assert first[-1].reason is Reason.RATE_LIMITED
    plug = reading(type="smart_plug", metrics={"on": True, "power_w": 1200})
    other = limited.process("devices/p1/telemetry", json.dumps(plug).encode(), NOW)[0]
    assert isinstance(other, Accepted)


@pytest.mark.parametrize(
    ("topic", "device_id"),
    [
        ("devices/t1/telemetry", "t1"),
        ("devices/t1/commands", None),
        ("devices/a/b/telemetry", None),
        ("x/t1/telemetry", None),
    ],
)
def test_telemetry_device_id(topic: str, device_id: str | None) -> None:
    """Only devices/{id}/telemetry names a device."""
    assert telemetry_device_id(topic) == device_id


def test_a_registered_device_s_status_becomes_an_availability_record() -> None:
    """`devices/{id}/status` `offline` is a record of iot.availability, the bridge's time."""
    [outcome] = validator().process("devices/t1/status", b"offline", NOW)
    assert isinstance(outcome, Presence)
    assert json.loads(outcome.value) == {
        "device_id": "t1", "online": False, "ts": NOW, "source": "envelope",
    }  # fmt: skip


def test_status_of_devices_unknown_or_disabled_is_counted_and_left() -> None:
    """Retained statuses outlive their devices: not dead letters, counted by reason."""
    judge = validator()
    assert judge.process("devices/gone/status", b"online", NOW) == []
    assert judge.process("devices/off/status", b"online", NOW) == []
    assert judge.process("devices/bad id!/status", b"online", NOW) == []
    assert judge.take_counts()[2] == {"unknown_device": 1, "device_disabled": 1, "invalid_id": 1}


def test_a_status_that_is_neither_online_nor_offline_is_a_dead_letter() -> None:
    """Anything but the two words is malformed, with what it said."""
    [outcome] = validator().process("devices/t1/status", b"sleepy", NOW)
    assert isinstance(outcome, Rejected)
    assert outcome.reason == Reason.MALFORMED
    assert "'online' or 'offline', not 'sleepy'" in outcome.detail
