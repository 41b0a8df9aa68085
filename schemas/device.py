"""A registered device: its id, type and the metadata every reading is tagged with."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


class DeviceType(StrEnum):
    """The device types of DESIGN.md; each has its own metrics model."""

    THERMOSTAT = "thermostat"
    AIR_QUALITY = "air_quality"
    MOTION = "motion"
    CONTACT = "contact"
    SMART_PLUG = "smart_plug"


DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
# Free text that ends up as InfluxDB tag values and table cells: one printable line.
Label = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]


def is_device_id(value: str) -> bool:
    return _DEVICE_ID.fullmatch(value) is not None


class Device(BaseModel):
    """One record of the registry topic `iot.devices` (key: `device_id`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: DeviceId
    type: DeviceType
    name: Label | None = None
    site: Label | None = None
    room: Label | None = None
    enabled: bool = True
    registered_at: int = Field(ge=0, description="epoch milliseconds of the first registration")
