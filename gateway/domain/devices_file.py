"""Device fields checked for people: one-line reasons, and CSV files of devices."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from pydantic import ValidationError

from schemas import Device, is_device_id
from schemas.device import check_time_zone
from schemas.types import BUILTIN_CATALOGUE, TypeCatalogue

__all__ = ["DeviceInputError", "build_device", "parse_devices_csv"]

CSV_COLUMNS = ("device_id", "type", "name", "site", "room", "tz")


class DeviceInputError(ValueError):
    """A device field a person typed is not valid; the message is one line."""


def build_device(
    device_id: str,
    device_type: str,
    *,
    registered_at: int,
    name: str | None = None,
    site: str | None = None,
    room: str | None = None,
    tz: str | None = None,
    enabled: bool = True,
    catalogue: TypeCatalogue = BUILTIN_CATALOGUE,
) -> Device:
    """A Device from text fields, or DeviceInputError saying what is wrong in one line.
    Its type must be one of `catalogue` (the built-in types and the types file's)."""
    if not is_device_id(device_id):
        raise DeviceInputError(
            f"invalid device id {device_id!r}: 1 to 64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    try:
        catalogue.check_type(device_type)
        if tz:
            check_time_zone(tz)
    except ValueError as exc:
        raise DeviceInputError(str(exc)) from None
    try:
        return Device(
            device_id=device_id,
            type=device_type,
            name=name or None,
            site=site or None,
            room=room or None,
            tz=tz or None,
            enabled=enabled,
            registered_at=registered_at,
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field_name = ".".join(str(part) for part in first["loc"])
        if field_name == "tz":
            raise DeviceInputError(first["msg"].removeprefix("Value error, ")) from None
        raise DeviceInputError(
            f"invalid {field_name}: one line of printable text, at most 128 characters"
        ) from None


@dataclass
class DeviceCsv:
    """The outcome of reading a CSV of devices: the good rows and every bad row's reason."""

    devices: list[Device] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "line N: reason"


def parse_devices_csv(
    text: str,
    *,
    registered_at: int,
    catalogue: TypeCatalogue = BUILTIN_CATALOGUE,
    default_tz: str | None = None,
) -> DeviceCsv:
    """Read `device_id,type,name,site,room,tz` rows; every bad row is reported by line number.

    The header must name `device_id` and `type`; `name`, `site`, `room` and `tz` are
    optional columns and may be empty (a row without `tz` gets `default_tz`). A device id
    given twice is an error on its second line.
    """
    result = DeviceCsv()
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    header = [column.strip() for column in reader.fieldnames or []]
    unknown = [column for column in header if column not in CSV_COLUMNS]
    missing = [column for column in ("device_id", "type") if column not in header]
    if missing or unknown:
        problems = [f"missing column {c}" for c in missing] + [
            f"unknown column {c}" for c in unknown
        ]
        result.errors.append(f"line 1: {', '.join(problems)} (header: {','.join(CSV_COLUMNS)})")
        return result
    reader.fieldnames = header
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if None in row:
            result.errors.append(f"line {line}: more fields than the header has")
            continue
        values = {key: (value or "").strip() for key, value in row.items()}
        if not any(values.values()):
            continue  # a blank line
        device_id = values["device_id"]
        if device_id in seen:
            result.errors.append(
                f"line {line}: device {device_id} already on line {seen[device_id]}"
            )
            continue
        try:
            device = build_device(
                device_id,
                values["type"],
                registered_at=registered_at,
                name=values.get("name"),
                site=values.get("site"),
                room=values.get("room"),
                tz=values.get("tz") or default_tz,
                catalogue=catalogue,
            )
        except DeviceInputError as exc:
            result.errors.append(f"line {line}: {exc}")
            continue
        seen[device_id] = line
        result.devices.append(device)
    return result
