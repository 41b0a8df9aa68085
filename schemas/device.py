"""A registered device: its id, type and the metadata every reading is tagged with."""

from __future__ import annotations

import re
import zoneinfo
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


class DeviceType(StrEnum):
    """The built-in device types of DESIGN.md; users add their own in `types.yaml`."""

    THERMOSTAT = "thermostat"
    AIR_QUALITY = "air_quality"
    MOTION = "motion"
    CONTACT = "contact"
    SMART_PLUG = "smart_plug"
    CLIMATE = "climate"


DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
# A built-in type or one of the types file's; whether it exists is checked against the
# catalogue where one is loaded (registration, validation), not by the record itself.
TYPE_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
TypeName = Annotated[str, StringConstraints(pattern=TYPE_NAME_PATTERN)]
# Free text that ends up as InfluxDB tag values and table cells: one printable line.
Label = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]


def check_time_zone(value: str) -> str:
    """`value` if this host knows the IANA zone; ValueError in one line if not."""
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: a zone folder such as "America", or a name too long for a file name.
        raise ValueError(
            f"unknown time zone {value!r}: use an IANA name like Europe/Berlin"
        ) from None
    return value


# A zone this host knows (settings, registration)...
TimeZone = Annotated[str, AfterValidator(check_time_zone)]
# ...and a zone's name in a registry record, which hosts with other tzdata read too (a
# zone one does not know is read as UTC there, the record kept).
TimeZoneName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$"),
]


def is_device_id(value: str) -> bool:
    return _DEVICE_ID.fullmatch(value) is not None


class Device(BaseModel):
    """One record of the registry topic `iot.devices` (key: `device_id`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: DeviceId
    type: TypeName
    name: Label | None = None
    site: Label | None = None
    room: Label | None = None
    enabled: bool = True
    tz: TimeZoneName | None = Field(
        default=None, description="IANA time zone of the device's clock (e.g. Europe/Berlin)"
    )
    registered_at: int = Field(ge=0, description="epoch milliseconds of the first registration")
