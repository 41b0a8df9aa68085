"""The reading envelope devices publish, one strict metrics model per device type."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)

from schemas.device import DeviceId

MAX_PAYLOAD_BYTES = 64 * 1024


def _to_epoch_ms(value: Any) -> Any:
    """`ts` as epoch milliseconds: an integer as is, RFC 3339 text only with an explicit offset.

    A timestamp without a zone is rejected, never guessed.
    """
    if isinstance(value, str):
        if len(value) < 19 or value[10] not in "Tt ":
            raise ValueError("ts text must be RFC 3339, e.g. 2026-11-26T07:00:00.123Z")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("ts text must be RFC 3339, e.g. 2026-11-26T07:00:00.123Z") from None
        if parsed.tzinfo is None:
            raise ValueError("ts has no time zone offset; add Z or +hh:mm")
        return int(parsed.timestamp() * 1000)
    return value


EpochMs = Annotated[
    StrictInt,
    Field(ge=0, le=253_402_300_799_999),  # up to year 9999
    BeforeValidator(_to_epoch_ms),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "description": "epoch milliseconds"},
                {
                    "type": "string",
                    "format": "date-time",
                    "description": "RFC 3339 with an explicit offset (Z or +hh:mm)",
                },
            ]
        }
    ),
]


def _range(low: float, high: float | None = None) -> Any:
    """A finite number in [low, high]; JSON integers are accepted, booleans and text are not."""
    return Field(ge=low, le=high, allow_inf_nan=False, strict=True)


Temperature = Annotated[float, _range(-40, 85)]
Percent = Annotated[float, _range(0, 100)]


class Metrics(BaseModel):
    """Fields of a device type; unknown fields are rejected, at least one must be present."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _not_empty(self) -> Metrics:
        if not self.model_fields_set:
            raise ValueError("metrics must hold at least one field")
        return self


class ThermostatMetrics(Metrics):
    temperature_c: Temperature | None = None
    humidity_pct: Percent | None = None
    setpoint_c: Annotated[float, _range(5, 35)] | None = None
    heating: StrictBool | None = None


class AirQualityMetrics(Metrics):
    co2_ppm: Annotated[float, _range(0, 10_000)] | None = None
    pm2_5_ugm3: Annotated[float, _range(0, 1000)] | None = None
    voc_index: Annotated[float, _range(0, 500)] | None = None
    temperature_c: Temperature | None = None
    humidity_pct: Percent | None = None


class MotionMetrics(Metrics):
    motion: StrictBool | None = None
    lux: Annotated[float, _range(0, 100_000)] | None = None
    battery_pct: Percent | None = None


class ContactMetrics(Metrics):
    open: StrictBool | None = None
    battery_pct: Percent | None = None


class SmartPlugMetrics(Metrics):
    on: StrictBool | None = None
    power_w: Annotated[float, _range(0, 4000)] | None = None
    voltage_v: Annotated[float, _range(0, 300)] | None = None
    current_a: Annotated[float, _range(0, 20)] | None = None
    energy_kwh: Annotated[float, _range(0)] | None = None


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: DeviceId | None = None
    ts: EpochMs
    seq: Annotated[StrictInt, Field(ge=0)] | None = None


class ThermostatReading(_Envelope):
    type: Literal["thermostat"]
    metrics: ThermostatMetrics


class AirQualityReading(_Envelope):
    type: Literal["air_quality"]
    metrics: AirQualityMetrics


class MotionReading(_Envelope):
    type: Literal["motion"]
    metrics: MotionMetrics


class ContactReading(_Envelope):
    type: Literal["contact"]
    metrics: ContactMetrics


class SmartPlugReading(_Envelope):
    type: Literal["smart_plug"]
    metrics: SmartPlugMetrics


Reading = Annotated[
    ThermostatReading | AirQualityReading | MotionReading | ContactReading | SmartPlugReading,
    Field(discriminator="type"),
]
READING = TypeAdapter[Reading](Reading)

# A payload is one reading or a device's batch of them.
Payload = Annotated[Reading | list[Reading], Field(description="one reading or a batch")]
PAYLOAD = TypeAdapter[Payload](Payload)


class CanonicalReading(BaseModel):
    """A validated reading as iotgw publishes it to `iot.readings` (schema `reading/v1`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: DeviceId
    type: str
    ts: int = Field(description="epoch milliseconds, the device's time")
    seq: int | None
    metrics: dict[str, float | bool]
    received_at: int = Field(description="epoch milliseconds when the bridge received it")
