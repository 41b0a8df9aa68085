"""Line protocol: escaping, field types, and records of Kafka turned into points."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from gateway.domain.lineprotocol import LineProtocolError, format_field, point, series_key
from gateway.services.writer import PointEncoder
from gateway.topics import Topics
from schemas import Device, DeviceType

pytestmark = pytest.mark.unit


def test_measurement_tags_and_field_keys_are_escaped() -> None:
    """Commas and spaces in measurements; commas, equals signs and spaces in keys and tags."""
    series = series_key("my measure,x", {"room": "living room", "a=b": "c,d", "site": "h\\q"})
    assert series == "my\\ measure\\,x,a\\=b=c\\,d,room=living\\ room,site=h\\\\q"
    line = point(series, {"field key": 1.5, "x,y": True}, 1000)
    assert line == f"{series} field\\ key=1.5,x\\,y=true 1000"


def test_tags_are_sorted_and_empty_ones_left_out() -> None:
    """Sorted tags are what InfluxDB stores fastest; an empty tag value is not allowed."""
    assert series_key("m", {"z": "1", "a": "2", "room": None, "site": ""}) == "m,a=2,z=1"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (42, "42i"),
        (-3, "-3i"),
        (21.5, "21.5"),
        (21.0, "21.0"),
        (1e-7, "1e-07"),
        ('say "hi" \\ bye', '"say \\"hi\\" \\\\ bye"'),
        ("", '""'),
    ],
)
def test_field_types_are_kept(value: float | int | bool | str, text: str) -> None:
    """bool, int (with i), float (never as int) and quoted strings."""
    assert format_field(value) == text


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_floats_are_refused(bad: float) -> None:
    """Line protocol has no NaN or infinity."""
    with pytest.raises(LineProtocolError):
        format_field(bad)


def test_newlines_in_names_are_refused() -> None:
    """A newline would end the line: it cannot be escaped, so it is an error."""
    with pytest.raises(LineProtocolError):
        series_key("m", {"room": "a\nb"})
    with pytest.raises(LineProtocolError):
        point("m", {}, 1)


@dataclass
class Record:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    timestamp: int = 0


TOPICS = Topics("iot")
REGISTRY = {
    "t1": Device(
        device_id="t1", type=DeviceType.THERMOSTAT, registered_at=0, site="home", room="kitchen"
    )
}


def test_reading_becomes_a_point_of_its_type_with_registry_tags() -> None:
    """Measurement = type; tags device_id, site, room; metrics and seq as fields; time = ts."""
    value = json.dumps(
        {
            "device_id": "t1",
            "type": "thermostat",
            "ts": 1795680000123,
            "seq": 9,
            "metrics": {"temperature_c": 21.0, "heating": True},
            "received_at": 1795680000200,
        }
    ).encode()
    line = PointEncoder(TOPICS, REGISTRY.get).encode(Record("iot.readings", value))
    assert line == (
        "thermostat,device_id=t1,room=kitchen,site=home "
        "temperature_c=21.0,heating=true,seq=9i 1795680000123"
    )


def test_reading_of_an_unregistered_device_has_only_its_id() -> None:
    """Without a registry entry there is no site or room to tag."""
    value = json.dumps(
        {"device_id": "x9", "type": "motion", "ts": 5, "seq": None, "metrics": {"motion": True}}
    ).encode()
    line = PointEncoder(TOPICS, REGISTRY.get).encode(Record("iot.readings", value))
    assert line == "motion,device_id=x9 motion=true 5"


def test_alert_becomes_a_point_of_the_alerts_measurement() -> None:
    """rule, device, state (and site, room) as tags; value as a float; message as a string."""
    value = json.dumps(
        {
            "rule": "door-left-open",
            "device_id": "t1",
            "state": "firing",
            "value": True,
            "ts": 77,
            "message": 'door "back" open',
        }
    ).encode()
    line = PointEncoder(TOPICS, REGISTRY.get).encode(Record("iot.alerts", value))
    assert line == (
        "alerts,device_id=t1,room=kitchen,rule=door-left-open,site=home,state=firing "
        'message="door \\"back\\" open",value=1.0 77'
    )


def test_dead_letter_becomes_a_rejected_point() -> None:
    """Dead letters are counted in InfluxDB by reason, at the time the bridge received them."""
    record = Record(
        "iot.readings.dlq",
        b"{bad",
        b"t1",
        [("error", b"malformed"), ("detail", b"not JSON"), ("received_at", b"123")],
    )
    line = PointEncoder(TOPICS, REGISTRY.get).encode(record)
    assert line == 'rejected,device_id=t1,reason=malformed detail="not JSON",bytes=4i 123'


def test_garbage_in_the_readings_topic_is_an_error() -> None:
    """A record that is not a canonical reading cannot become a point."""
    with pytest.raises(ValueError, match="expected ident"):
        PointEncoder(TOPICS, REGISTRY.get).encode(Record("iot.readings", b"nope"))


@pytest.mark.parametrize(
    "metrics",
    [
        b'{"temperature_c": null}',
        b'{"temperature_c": [1]}',
        b'{"temperature_c": NaN}',
        b'{"temperature_c": -Infinity}',
        b"[]",
        b'"hot"',
    ],
)
def test_metrics_that_are_no_fields_are_an_error(metrics: bytes) -> None:
    """null, lists, NaN, infinities or metrics that are no object: LineProtocolError, which
    the writer turns into a dead letter, never a crash or a line InfluxDB refuses."""
    value = b'{"device_id": "t1", "type": "thermostat", "ts": 5, "metrics": ' + metrics + b"}"
    with pytest.raises(LineProtocolError):
        PointEncoder(TOPICS, REGISTRY.get).encode(Record("iot.readings", value))


def test_field_keys_are_escaped_per_point_of_any_series() -> None:
    """A field key needing escapes is escaped in every point, first or later, of any series."""
    first = point("m", {"a b": 1.5, "c": 2}, 1)
    again = point("n,x=1", {"a b": False, "c,d": "v"}, 2)
    assert (first, again) == ("m a\\ b=1.5,c=2i 1", 'n,x=1 a\\ b=false,c\\,d="v" 2')


def test_a_metric_named_seq_gives_way_to_the_readings_seq() -> None:
    """`seq` is written once, the reading's own, as an integer."""
    value = b'{"device_id": "x9", "type": "m", "ts": 5, "seq": 3, "metrics": {"seq": 1.0, "a": 1}}'
    line = PointEncoder(TOPICS, REGISTRY.get).encode(Record("iot.readings", value))
    assert line == "m,device_id=x9 seq=3i,a=1i 5"
