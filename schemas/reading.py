"""The reading envelope devices publish, one strict metrics model per device type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.device import DeviceId
from schemas.types import BUILTIN_CATALOGUE

MAX_PAYLOAD_BYTES = 64 * 1024

# One reading of any built-in type (a discriminated union on `type`). Processes that read
# a types file use their own catalogue's (schemas.types.load_catalogue).
READING = BUILTIN_CATALOGUE.reading


class CanonicalReading(BaseModel):
    """A validated reading as iotgw publishes it to `iot.readings` (schema `reading/v1`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: DeviceId
    type: str
    ts: int = Field(description="epoch milliseconds, the device's time")
    seq: int | None
    metrics: dict[str, float | bool]
    received_at: int = Field(description="epoch milliseconds when the bridge received it")
