"""Device types: the built-in ones and those a user defines in `types.yaml`, each a metrics model.

A type is a name and its metrics, each with a kind (float, int, bool) and a range. The
built-in types and the user's are the same kind of thing: one `TypeCatalogue` builds the
strict pydantic models every reading is validated with, its JSON Schema, the metric names
rules may use, and what the simulator plays.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    field_validator,
    with_config,
)
from typing_extensions import TypedDict

from schemas.device import TYPE_NAME_PATTERN, DeviceId, DeviceType
from schemas.documents import parse_document
from schemas.timestamps import EpochMs

__all__ = [
    "BUILTIN_TYPES",
    "MetricSpec",
    "TypeCatalogue",
    "TypeSpec",
    "TypesFileError",
    "load_catalogue",
]

_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_UNIT = re.compile(r"^[a-z0-9]{1,16}$")
# InfluxDB measurements iotgw writes besides the device types' own.
RESERVED_NAMES = frozenset({"alerts", "availability", "rejected", "iotgw_writer"})
# Names a metric cannot have: InfluxDB refuses a field named `time`; the writer adds `seq`
# and tags every point with device_id, site and room.
RESERVED_METRICS = frozenset({"time", "seq", "device_id", "site", "room"})
Kind = Literal["float", "int", "bool"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: its name (the unit is its suffix), kind and range."""

    name: str
    kind: Kind
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"metric name {self.name!r} must match {_METRIC_NAME.pattern}")
        if self.name in RESERVED_METRICS:
            raise ValueError(f"metric name {self.name} is taken by the points iotgw writes")
        if self.kind == "bool" and (self.low is not None or self.high is not None):
            raise ValueError(f"metric {self.name}: a bool has no range")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"metric {self.name}: min {self.low:g} is above max {self.high:g}")

    def annotation(self) -> Any:
        """The pydantic type of its value: strict (no text, no bool for a number), finite,
        in range; null is accepted and means "not measured"."""
        if self.kind == "bool":
            return StrictBool | None
        if self.kind == "int":
            return Annotated[StrictInt, Field(ge=self.low, le=self.high)] | None
        bounds = Field(ge=self.low, le=self.high, allow_inf_nan=False, strict=True)
        return Annotated[float, bounds] | None


@dataclass(frozen=True)
class TypeSpec:
    """A device type: its name (also its InfluxDB measurement) and its metrics."""

    name: str
    metrics: tuple[MetricSpec, ...]
    builtin: bool = False

    def __post_init__(self) -> None:
        if not re.fullmatch(TYPE_NAME_PATTERN, self.name):
            raise ValueError(f"type name {self.name!r} must match {TYPE_NAME_PATTERN}")
        if not self.metrics:
            raise ValueError(f"type {self.name} has no metrics")
        names = [m.name for m in self.metrics]
        twice = next((name for name in names if names.count(name) > 1), None)
        if twice is not None:
            raise ValueError(f"type {self.name} names metric {twice} twice")

    @functools.cached_property
    def metric_names(self) -> frozenset[str]:
        return frozenset(m.name for m in self.metrics)

    @functools.cached_property
    def booleans(self) -> frozenset[str]:
        return frozenset(m.name for m in self.metrics if m.kind == "bool")

    def metric(self, name: str) -> MetricSpec | None:
        return next((m for m in self.metrics if m.name == name), None)


def _m(
    name: str, kind: Kind = "float", low: float | None = None, high: float | None = None
) -> MetricSpec:
    return MetricSpec(name, kind, low, high)


_TEMPERATURE = _m("temperature_c", low=-40, high=85)
_HUMIDITY = _m("humidity_pct", low=0, high=100)
_BATTERY = _m("battery_pct", low=0, high=100)

# DESIGN.md's types, in the order the contract lists them.
BUILTIN_TYPES: tuple[TypeSpec, ...] = tuple(
    TypeSpec(name.value, metrics, builtin=True)
    for name, metrics in (
        (
            DeviceType.THERMOSTAT,
            (_TEMPERATURE, _HUMIDITY, _m("setpoint_c", low=5, high=35), _m("heating", "bool")),
        ),
        (
            DeviceType.AIR_QUALITY,
            (
                _m("co2_ppm", low=0, high=10_000),
                _m("pm2_5_ugm3", low=0, high=1000),
                _m("voc_index", low=0, high=500),
                _TEMPERATURE,
                _HUMIDITY,
            ),
        ),
        (DeviceType.MOTION, (_m("motion", "bool"), _m("lux", low=0, high=100_000), _BATTERY)),
        (DeviceType.CONTACT, (_m("open", "bool"), _BATTERY)),
        (
            DeviceType.SMART_PLUG,
            (
                _m("on", "bool"),
                _m("power_w", low=0, high=4000),
                _m("voltage_v", low=0, high=300),
                _m("current_a", low=0, high=20),
                _m("energy_kwh", low=0),
            ),
        ),
        (
            DeviceType.CLIMATE,
            (_TEMPERATURE, _HUMIDITY, _m("pressure_hpa", low=300, high=1100), _BATTERY),
        ),
    )
)


def _not_empty(metrics: Any) -> Any:
    if not metrics:
        raise ValueError("metrics must hold at least one field")
    return metrics


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


# Types are built at run time from data (the user's come from a file).
_TYPED_DICT: Any = TypedDict
_FORBID = ConfigDict(extra="forbid")


def _metrics_model(spec: TypeSpec) -> Any:
    # Readings are TypedDicts, not models: the bridge validates every one straight from
    # its JSON bytes into plain dicts, at about half the cost of building model instances.
    fields = {m.name: m.annotation() for m in spec.metrics}
    return with_config(_FORBID)(_TYPED_DICT(f"{_camel(spec.name)}Metrics", fields, total=False))


def _reading_model(spec: TypeSpec, metrics: Any) -> Any:
    return with_config(_FORBID)(
        _TYPED_DICT(
            f"{_camel(spec.name)}Reading",
            {
                "device_id": NotRequired[DeviceId | None],
                "type": Literal[spec.name],
                "ts": EpochMs,
                "seq": NotRequired[Annotated[StrictInt, Field(ge=0)] | None],
                "metrics": Annotated[metrics, AfterValidator(_not_empty)],
            },
        )
    )


class TypeCatalogue:
    """The device types a process knows: the built-in ones, then the user's."""

    def __init__(self, user_types: Iterable[TypeSpec] = ()) -> None:
        self.types: dict[str, TypeSpec] = {t.name: t for t in BUILTIN_TYPES}
        for spec in user_types:
            known = self.types.get(spec.name)
            if known is not None and not known.builtin:
                raise ValueError(f"type {spec.name} is defined twice")
            if known is not None or spec.name in RESERVED_NAMES:
                raise ValueError(f"type {spec.name} is already defined by iotgw")
            self.types[spec.name] = spec
        self._metrics = {name: _metrics_model(spec) for name, spec in self.types.items()}
        self._readings = {
            name: _reading_model(spec, self._metrics[name]) for name, spec in self.types.items()
        }
        union: Any = functools.reduce(lambda a, b: a | b, self._readings.values())
        self.reading_type: Any = cast(Any, Annotated[union, Field(discriminator="type")])
        self.reading = TypeAdapter[Any](self.reading_type)
        one_or_batch: Any = self.reading_type | list[self.reading_type]  # type: ignore[name-defined]
        self.payload = TypeAdapter[Any](
            cast(Any, Annotated[one_or_batch, Field(description="one reading or a batch")])
        )

    @property
    def names(self) -> list[str]:
        return list(self.types)

    @property
    def user_types(self) -> list[TypeSpec]:
        return [t for t in self.types.values() if not t.builtin]

    def get(self, name: str) -> TypeSpec | None:
        return self.types.get(name)

    @functools.cache  # noqa: B019 - one adapter per type, for the catalogue's lifetime
    def metrics_adapter(self, name: str) -> TypeAdapter[Any]:
        """Validates a metrics dict of type `name` (strict, at least one metric)."""
        return TypeAdapter[Any](
            cast(Any, Annotated[self._metrics[name], AfterValidator(_not_empty)])
        )

    def metric_names(self, name: str) -> frozenset[str]:
        spec = self.types.get(name)
        return spec.metric_names if spec else frozenset()

    def check_type(self, name: str) -> str:
        """`name` if it is a known type; ValueError naming the known ones if not."""
        if name not in self.types:
            raise ValueError(f"unknown device type {name!r}: use one of {', '.join(self.types)}")
        return name


class _MetricEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the metric's name without its unit")
    unit: str | None = Field(default=None, description="unit suffix, e.g. c, pct, ppm, w")
    kind: Kind = "float"
    min: float | None = None
    max: float | None = None

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str | None) -> str | None:
        if value is not None and not _UNIT.fullmatch(value):
            raise ValueError("a unit suffix is 1 to 16 lower-case letters or digits, e.g. pct")
        return value

    def spec(self) -> MetricSpec:
        name = f"{self.name}_{self.unit}" if self.unit else self.name
        return MetricSpec(name, self.kind, self.min, self.max)


class _TypeEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    metrics: list[_MetricEntry] = Field(min_length=1)

    def spec(self) -> TypeSpec:
        return TypeSpec(self.name, tuple(m.spec() for m in self.metrics))


class _TypesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    types: list[_TypeEntry] = Field(default_factory=list)


class TypesFileError(ValueError):
    """A types file that cannot be used, with a one-line reason."""


def parse_types(text: str, origin: str = "types.yaml") -> TypeCatalogue:
    """The catalogue of a types file's text; TypesFileError with the first problem."""
    try:
        parsed = parse_document(text, _TypesFile, origin, "types")
    except ValueError as exc:
        raise TypesFileError(str(exc)) from None
    specs = []
    for i, entry in enumerate(parsed.types):
        try:
            specs.append(entry.spec())
        except ValueError as exc:
            # The type's name and its place: the message names the metric.
            raise TypesFileError(f"{origin}: types.{i} ({entry.name}): {exc}") from None
    try:
        return TypeCatalogue(specs)
    except ValueError as exc:
        raise TypesFileError(f"{origin}: {exc}") from None


@functools.lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int) -> TypeCatalogue:
    return parse_types(path.read_text(), str(path))


def load_catalogue(path: Path | None) -> TypeCatalogue:
    """The built-in types plus those of the types file at `path` (absent: built-ins only)."""
    if path is None:
        return BUILTIN_CATALOGUE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return BUILTIN_CATALOGUE
    except OSError as exc:
        raise TypesFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return _load(path, stat.st_mtime_ns)
    except OSError as exc:
        raise TypesFileError(f"cannot read {path}: {exc.strerror}") from None


BUILTIN_CATALOGUE = TypeCatalogue()
