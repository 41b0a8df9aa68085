"""The reading envelope devices publish, one strict metrics model per device type."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    WithJsonSchema,
    with_config,
)
from typing_extensions import TypedDict

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


def _not_empty(metrics: Any) -> Any:
    if not metrics:
        raise ValueError("metrics must hold at least one field")
    return metrics


# Readings are TypedDicts, not models: the bridge validates every one straight from its
# JSON bytes into plain dicts, at about half the cost of building two model instances.
@with_config(ConfigDict(extra="forbid"))
class ThermostatMetrics(TypedDict, total=False):
    temperature_c: Temperature | None
    humidity_pct: Percent | None
    setpoint_c: Annotated[float, _range(5, 35)] | None
    heating: StrictBool | None


@with_config(ConfigDict(extra="forbid"))
class AirQualityMetrics(TypedDict, total=False):
    co2_ppm: Annotated[float, _range(0, 10_000)] | None
    pm2_5_ugm3: Annotated[float, _range(0, 1000)] | None
    voc_index: Annotated[float, _range(0, 500)] | None
    temperature_c: Temperature | None
    humidity_pct: Percent | None


@with_config(ConfigDict(extra="forbid"))
class MotionMetrics(TypedDict, total=False):
    motion: StrictBool | None
    lux: Annotated[float, _range(0, 100_000)] | None
    battery_pct: Percent | None


@with_config(ConfigDict(extra="forbid"))
class ContactMetrics(TypedDict, total=False):
    open: StrictBool | None
    battery_pct: Percent | None


@with_config(ConfigDict(extra="forbid"))
class SmartPlugMetrics(TypedDict, total=False):
    on: StrictBool | None
    power_w: Annotated[float, _range(0, 4000)] | None
    voltage_v: Annotated[float, _range(0, 300)] | None
    current_a: Annotated[float, _range(0, 20)] | None
    energy_kwh: Annotated[float, _range(0)] | None


# The metrics of every device type (unknown fields are rejected, at least one present).
Metrics = ThermostatMetrics | AirQualityMetrics | MotionMetrics | ContactMetrics | SmartPlugMetrics


@with_config(ConfigDict(extra="forbid"))
class _Envelope(TypedDict):
    device_id: NotRequired[DeviceId | None]
    ts: EpochMs
    seq: NotRequired[Annotated[StrictInt, Field(ge=0)] | None]


@with_config(ConfigDict(extra="forbid"))
class ThermostatReading(_Envelope):
    type: Literal["thermostat"]
    metrics: Annotated[ThermostatMetrics, AfterValidator(_not_empty)]


@with_config(ConfigDict(extra="forbid"))
class AirQualityReading(_Envelope):
    type: Literal["air_quality"]
    metrics: Annotated[AirQualityMetrics, AfterValidator(_not_empty)]


@with_config(ConfigDict(extra="forbid"))
class MotionReading(_Envelope):
    type: Literal["motion"]
    metrics: Annotated[MotionMetrics, AfterValidator(_not_empty)]


@with_config(ConfigDict(extra="forbid"))
class ContactReading(_Envelope):
    type: Literal["contact"]
    metrics: Annotated[ContactMetrics, AfterValidator(_not_empty)]


@with_config(ConfigDict(extra="forbid"))
class SmartPlugReading(_Envelope):
    type: Literal["smart_plug"]
    metrics: Annotated[SmartPlugMetrics, AfterValidator(_not_empty)]


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
