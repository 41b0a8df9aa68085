"""Device records, the fields people type, and CSV files of devices."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from gateway.cli.app import app
from gateway.domain.devices_file import DeviceInputError, build_device, parse_devices_csv
from schemas import Device, DeviceType
from schemas.types import parse_types

pytestmark = pytest.mark.unit

T0 = 1_795_680_000_000


@pytest.mark.parametrize("device_id", ["a", "thermo-kitchen", "Plug_01", "x" * 64, "9lives"])
def test_valid_ids_are_accepted(device_id: str) -> None:
    """Ids of DESIGN.md: a letter or digit, then up to 63 letters, digits, _ or -."""
    assert build_device(device_id, "motion", registered_at=T0).device_id == device_id


@pytest.mark.parametrize("device_id", ["", "-x", "_x", "x" * 65, "a b", "ü", "a/b", "a+b", "a\n"])
def test_invalid_ids_are_refused_in_one_line(device_id: str) -> None:
    """A bad id is named in a single-line reason."""
    with pytest.raises(DeviceInputError, match="invalid device id") as caught:
        build_device(device_id, "motion", registered_at=T0)
    assert "\n" not in str(caught.value).replace(repr(device_id), "")


def test_unknown_type_lists_the_known_ones() -> None:
    """An unknown type is refused with the list of types to choose from."""
    with pytest.raises(DeviceInputError, match="use one of thermostat, air_quality"):
        build_device("d1", "toaster", registered_at=T0)


def test_control_characters_in_labels_are_refused() -> None:
    """Site, room and name end up as tags and table cells: one printable line only."""
    with pytest.raises(DeviceInputError, match="invalid site"):
        build_device("d1", "contact", registered_at=T0, site="home\nx")


def test_record_round_trips_as_json_with_design_fields() -> None:
    """The registry record has exactly the fields of DESIGN.md and decodes to itself."""
    device = build_device("d1", "smart_plug", registered_at=T0, name="Kettle", room="kitchen")
    data = device.model_dump(mode="json")
    assert list(data) == [
        "device_id", "type", "name", "site", "room", "enabled", "tz", "registered_at",
    ]  # fmt: skip
    assert data["type"] == "smart_plug"
    assert data["site"] is None
    assert Device.model_validate_json(device.model_dump_json()) == device


def test_record_with_unknown_field_is_invalid() -> None:
    """A record with a field the contract lacks is not silently accepted."""
    with pytest.raises(ValidationError):
        Device.model_validate(
            {"device_id": "d1", "type": "motion", "registered_at": T0, "colour": "red"}
        )


def test_csv_with_good_rows_gives_devices() -> None:
    """Every good row becomes a device; empty optional cells are None; blank lines pass."""
    text = (
        "device_id,type,name,site,room\n"
        "t1,thermostat,Kitchen thermostat,home,kitchen\n"
        "\n"
        "m1,motion,,home,\n"
    )
    parsed = parse_devices_csv(text, registered_at=T0)
    assert parsed.errors == []
    assert [(d.device_id, d.type, d.name, d.room) for d in parsed.devices] == [
        ("t1", DeviceType.THERMOSTAT, "Kitchen thermostat", "kitchen"),
        ("m1", DeviceType.MOTION, None, None),
    ]


def test_csv_reports_every_bad_row_with_its_line() -> None:
    """Bad id, unknown type, a repeated id and extra fields are each reported by line."""
    text = (
        "device_id,type,name,site,room\n"  # line 1
        "good-1,contact,,,\n"  # 2
        "bad id,contact,,,\n"  # 3
        "p1,toaster,,,\n"  # 4
        "good-1,contact,,,\n"  # 5
        "x1,motion,a,b,c,d\n"  # 6
        "good-2,air_quality,,,\n"  # 7
    )
    parsed = parse_devices_csv(text, registered_at=T0)
    assert [d.device_id for d in parsed.devices] == ["good-1", "good-2"]
    assert [e.split(":")[0] for e in parsed.errors] == ["line 3", "line 4", "line 5", "line 6"]
    assert "already on line 2" in parsed.errors[2]


def test_csv_needs_id_and_type_columns_only() -> None:
    """A header of device_id,type suffices; a missing or unknown column is an error on line 1."""
    assert parse_devices_csv("device_id,type\nd1,motion\n", registered_at=T0).errors == []
    errors = parse_devices_csv("id,type,floor\nd1,motion,2\n", registered_at=T0).errors
    assert errors == [
        "line 1: missing column device_id, unknown column id, unknown column floor "
        "(header: device_id,type,name,site,room,tz)"
    ]


def test_register_refuses_bad_input_with_exit_2_before_any_connection() -> None:
    """`devices register` checks id and type first: exit 2, one line, no Kafka needed."""
    runner = CliRunner()
    env = {"IOTGW_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    bad_id = runner.invoke(app, ["devices", "register", "no good", "--type", "motion"], env=env)
    bad_type = runner.invoke(app, ["devices", "register", "d1", "--type", "kettle"], env=env)
    for result in (bad_id, bad_type):
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1
    assert "invalid device id" in bad_id.stderr
    assert "unknown device type 'kettle'" in bad_type.stderr


def test_a_time_zone_is_an_iana_name_or_refused_in_one_line() -> None:
    """`--tz` takes an IANA zone (for devices that send local time); anything else is one line."""
    device = build_device("plug-1", "smart_plug", registered_at=0, tz="Europe/Berlin")
    assert device.tz == "Europe/Berlin"
    for wrong in ("CEST", "America", "x" * 300):
        with pytest.raises(DeviceInputError, match=r"^unknown time zone '.*': use an IANA name"):
            build_device("plug-1", "smart_plug", registered_at=0, tz=wrong)


def test_a_record_keeps_a_zone_this_host_does_not_know() -> None:
    """The registry is read on every host: a zone missing from one's tzdata keeps the record."""
    record = Device(device_id="plug-1", type="smart_plug", tz="Mars/Olympus_Mons", registered_at=0)
    assert record.tz == "Mars/Olympus_Mons"


def test_csv_rows_take_their_tz_or_the_import_default() -> None:
    """A row's tz wins; rows without one get `--tz`; a bad one is that row's error."""
    text = (
        "device_id,type,tz\n"
        "pow1,smart_plug,America/New_York\n"
        "pow2,smart_plug,\n"
        "pow3,smart_plug,Mars/Base\n"
    )
    parsed = parse_devices_csv(text, registered_at=0, default_tz="Europe/Berlin")
    assert [(d.device_id, d.tz) for d in parsed.devices] == [
        ("pow1", "America/New_York"), ("pow2", "Europe/Berlin")
    ]  # fmt: skip
    assert parsed.errors == [
        "line 4: unknown time zone 'Mars/Base': use an IANA name like Europe/Berlin"
    ]


def test_a_type_of_the_types_file_can_be_registered() -> None:
    """Registration checks the type against the catalogue: the built-in climate, the user's."""
    catalogue = parse_types("types: [{name: soil_probe, metrics: [{name: leak, kind: bool}]}]")
    assert build_device("probe-1", "soil_probe", registered_at=0, catalogue=catalogue).type == (
        "soil_probe"
    )
    assert build_device("climate-1", "climate", registered_at=0).type == "climate"
    with pytest.raises(DeviceInputError, match="soil_probe"):
        build_device("probe-1", "soil_probe", registered_at=0)
