"""Hostile payloads: hypothesis strategies and a corpus of nasty cases, for the property
tests of validation and for the live bridge under hostile input."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.clock import now_ms
from schemas.reading import MAX_PAYLOAD_BYTES

# DESIGN.md, "Rejections": the only reasons a dead letter may carry.
REASONS = {
    "malformed", "too_large", "schema", "id_mismatch", "unknown_device", "device_disabled",
    "type_mismatch", "clock_skew", "rate_limited",
}  # fmt: skip
DEVICE_TYPES = ["thermostat", "air_quality", "motion", "contact", "smart_plug"]
METRIC_NAMES = [
    "temperature_c", "humidity_pct", "setpoint_c", "heating", "co2_ppm", "pm2_5_ugm3",
    "voc_index", "motion", "lux", "battery_pct", "open", "on", "power_w", "voltage_v",
    "current_a", "energy_kwh", "unknown_field",
]  # fmt: skip
NASTY_TEXT = ["", " ", "\x00", "\x1b[31m", "\u202e", "\U0001f600", "a" * 300, "thermo\nkitchen"]


def valid_reading(seq: int = 0, **changes: Any) -> dict[str, Any]:
    reading: dict[str, Any] = {
        "type": "thermostat",
        "ts": now_ms(),
        "seq": seq,
        "metrics": {"temperature_c": 21.5, "heating": True},
    }
    reading.update(changes)
    return reading


def _deep(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def nasty_corpus(device_id: str) -> list[tuple[str, bytes]]:
    """Named payloads that have broken parsers and validators elsewhere."""
    good = valid_reading()
    item = _json(valid_reading())
    head = b'{"type":"thermostat","ts":1,"metrics":'
    return [
        ("invalid UTF-8", b'{"type": "thermostat", "ts": 1, "\xff\xfe": 1}'),
        ("invalid UTF-8 alone", b"\xc3\x28\xa0\xa1\xe2\x28\xa1"),
        ("NaN", _json(valid_reading(metrics={"temperature_c": float("nan")}))),
        ("Infinity", head + b'{"temperature_c":Infinity}}'),
        ("-Infinity in a batch", b"[" + head + b'{"setpoint_c":-Infinity}}]'),
        ("1e308", _json(valid_reading(metrics={"temperature_c": 1e308}))),
        ("1e309", head + b'{"temperature_c":1e309}}'),
        ("a 5,000-digit number", head + b'{"temperature_c":' + b"9" * 5000 + b"}}"),
        ("huge ts", _json(valid_reading(ts=10**30))),
        ("1,000-deep nesting", _deep(1000)),
        ("1,000-deep nesting in metrics", head + _deep(1000) + b"}"),
        ("1,000-deep arrays", b"[" * 1000 + b"]" * 1000),
        ("100,000-element batch", b"[" + b",".join([item] * 100_000) + b"]"),
        ("100,000 empty objects", b"[" + b",".join([b"{}"] * 100_000) + b"]"),
        ("just over the size limit", b'{"pad":"' + b"x" * (MAX_PAYLOAD_BYTES - 9) + b'"}'),
        ("far over the size limit", b"[" + b"1," * 600_000 + b"1]"),
        ("control characters in device_id", _json({**good, "device_id": "th\x00\x01rmo"})),
        ("unicode device_id", _json({**good, "device_id": "\u0442\u0435\u202e\u0440"})),
        ("another device's id", _json({**good, "device_id": device_id + "x"})),
        ("duplicated keys", b'{"type":"thermostat","type":"motion","ts":1,"ts":2,"metrics":{}}'),
        ("duplicated metric keys", head + b'{"temperature_c":1,"temperature_c":900}}'),
        ("empty", b""),
        ("whitespace", b" \n\t "),
        ("null", b"null"),
        ("a string", b'"thermostat"'),
        ("a number", b"42"),
        ("empty batch", b"[]"),
        ("batch of junk", b'[1, "a", null, [], {}, true]'),
        ("truncated", _json(good)[:-3]),
        ("trailing garbage", _json(good) + b"}}"),
        ("byte order mark", b"\xef\xbb\xbf" + _json(good)),
        ("ts without zone", _json(valid_reading(ts="2026-11-26T07:00:00"))),
        ("ts an hour ahead", _json(valid_reading(ts=now_ms() + 3_600_000))),
        ("negative seq", _json(valid_reading(seq=-1))),
        ("a boolean for a number", _json(valid_reading(metrics={"temperature_c": True}))),
        ("a number for a boolean", _json(valid_reading(metrics={"heating": 1}))),
        ("empty metrics", _json(valid_reading(metrics={}))),
    ]


def _numbers() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0, -0.0, 1e308, -1e308, 5e-324, 2**53 + 1]),
    )


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(), st.booleans(), _numbers(), st.text(max_size=8), st.sampled_from(NASTY_TEXT)
    )
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.text(max_size=6), children, max_size=3),
        ),
        max_leaves=6,
    )


_JSON = json_values()
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.one_of(st.sampled_from(DEVICE_TYPES), _JSON),
    "ts": st.one_of(
        st.builds(now_ms),
        st.integers(min_value=-(2**64), max_value=2**64),
        st.sampled_from(["2026-11-26T07:00:00.123Z", "2026-11-26T07:00:00", "yesterday"]),
        _JSON,
    ),
    "seq": st.one_of(st.integers(min_value=-5, max_value=2**64), _JSON),
    "metrics": st.one_of(
        st.dictionaries(
            st.sampled_from(METRIC_NAMES), st.one_of(_numbers(), st.booleans()), max_size=6
        ),
        _JSON,
    ),
    "unexpected": _JSON,
}


def near_readings(device_id: str) -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like readings, with any part missing, wrong or strange."""
    ids = st.sampled_from([device_id, device_id.upper(), *NASTY_TEXT])
    return st.fixed_dictionaries({}, optional={"device_id": ids, **_FIELDS})


def _encode(value: Any) -> bytes:
    # allow_nan: NaN and Infinity go out as the bare words a careless device would send.
    return json.dumps(value, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


def payloads(device_id: str) -> st.SearchStrategy[bytes]:
    """Bytes a device might publish: random bytes, any JSON, near-readings, batches of them."""
    reading = near_readings(device_id)
    return st.one_of(
        st.binary(max_size=300),
        json_values().map(_encode),
        reading.map(_encode),
        st.lists(reading, max_size=8).map(_encode),
        st.builds(lambda r, cut: _encode(r)[:cut], reading, st.integers(0, 200)),
    )


def draw_payloads(device_id: str, count: int) -> list[bytes]:
    """`count` payloads drawn from `payloads(device_id)`, the same ones on every run."""
    drawn: list[bytes] = []

    @settings(
        max_examples=count, database=None, derandomize=True, deadline=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(payloads(device_id))
    def collect(payload: bytes) -> None:
        drawn.append(payload)

    collect()
    return drawn
