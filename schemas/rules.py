"""Alerting rules as YAML (DESIGN.md, "Rules"): threshold, absence, rate, state and offline."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)

from schemas.device import DeviceId, TypeName
from schemas.types import BUILTIN_CATALOGUE, TypeCatalogue

# A duration's units in seconds (a year is 365 days): rules take up to days, InfluxDB's
# retention (gateway/domain/rollups.py) up to years.
DURATION_UNITS_S = {
    "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400,
}  # fmt: skip
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)\s*$")
_RULE_UNITS = ("ms", "s", "m", "h", "d")


def duration_seconds(text: str, units: Collection[str]) -> float | None:
    """`text`, a number and one of `units` (`30s`, `1.5h`), in seconds; None if not one."""
    match = _DURATION.match(text)
    if not match or match.group(2) not in units:
        return None
    return float(match.group(1)) * DURATION_UNITS_S[match.group(2)]


def _seconds(value: Any) -> Any:
    """`30s`, `5m`, `1h`, `250ms`, `2d` (or a number of seconds) as seconds."""
    if isinstance(value, str):
        seconds = duration_seconds(value, _RULE_UNITS)
        if seconds is None:
            raise ValueError("a duration is a number and a unit: 500ms, 30s, 5m, 1h, 2d")
        return seconds
    return value


Duration = Annotated[float, BeforeValidator(_seconds), Field(ge=0)]
RuleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


def _catalogue(info: ValidationInfo) -> TypeCatalogue:
    """The device types rules may name: the validation context's `catalogue` (the types
    file's), else the built-in ones."""
    context = info.context
    catalogue = context.get("catalogue") if isinstance(context, dict) else None
    return catalogue if isinstance(catalogue, TypeCatalogue) else BUILTIN_CATALOGUE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MqttCommand(_Strict):
    """Publish `payload` as JSON to devices/{device_id}/commands (QoS 1) when firing."""

    payload: dict[str, Any]


class Webhook(_Strict):
    """POST the alert as JSON to `url` on firing and on resolved."""

    url: AnyHttpUrl
    timeout: Duration = 5.0
    retries: int = Field(default=3, ge=0, le=10)


class Action(_Strict):
    mqtt_command: MqttCommand | None = None
    webhook: Webhook | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Action:
        if (self.mqtt_command is None) == (self.webhook is None):
            raise ValueError("an action is either mqtt_command or webhook")
        return self


class _Rule(_Strict):
    id: RuleId
    device_types: list[TypeName] | None = None
    devices: list[DeviceId] | None = None
    site: str | None = None
    room: str | None = None
    actions: list[Action] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_types(self, info: ValidationInfo) -> _Rule:
        catalogue = _catalogue(info)
        for name in self.device_types or ():
            catalogue.check_type(name)
        return self

    def metric_check(self, metric: str, info: ValidationInfo, *, boolean: bool) -> None:
        """The metric exists (with the right kind) in every device type the rule covers."""
        catalogue = _catalogue(info)
        types = [
            catalogue.types[t] for t in self.device_types or catalogue.names if t in catalogue.types
        ]
        owners = [t for t in types if metric in t.metric_names]
        if not owners:
            raise ValueError(
                f"no device type {'in scope ' if self.device_types else ''}has a metric {metric!r}"
            )
        if self.device_types and len(owners) < len(types):
            missing = ", ".join(t.name for t in types if t not in owners)
            raise ValueError(f"metric {metric!r} is not a metric of {missing}")
        if any((metric in t.booleans) != boolean for t in owners):
            kind = "an on/off" if boolean else "a numeric"
            raise ValueError(f"metric {metric!r} is not {kind} metric")


class ThresholdRule(_Rule):
    """`metric op value` held for `for`; resolved when the metric is back past `clear`."""

    kind: Literal["threshold"]
    metric: str
    op: Literal[">", ">=", "<", "<="]
    value: float
    for_: Duration = Field(default=0.0, alias="for")
    clear: float | None = None

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> ThresholdRule:
        self.metric_check(self.metric, info, boolean=False)
        if self.clear is not None:
            above = self.op in (">", ">=")
            if (above and self.clear > self.value) or (not above and self.clear < self.value):
                side = "at or below" if above else "at or above"
                raise ValueError(f"clear must be {side} value for op {self.op!r} (hysteresis)")
        return self


class AbsenceRule(_Rule):
    """No reading from a device for `after` (wall clock); resolved by its next reading."""

    kind: Literal["absence"]
    after: Duration = Field(gt=0)


class RateRule(_Rule):
    """The metric changes faster than `per_minute` (either way) over `window`."""

    kind: Literal["rate"]
    metric: str
    per_minute: float = Field(gt=0)
    window: Duration = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _numeric(self, info: ValidationInfo) -> RateRule:
        self.metric_check(self.metric, info, boolean=False)
        return self


class StateRule(_Rule):
    """An on/off metric equals `equals` for `for`."""

    kind: Literal["state"]
    metric: str
    equals: bool
    for_: Duration = Field(default=0.0, alias="for")

    @model_validator(mode="after")
    def _boolean(self, info: ValidationInfo) -> StateRule:
        self.metric_check(self.metric, info, boolean=True)
        return self


class OfflineRule(_Rule):
    """A device said it is offline (its last will, or its source's availability topic) and
    stayed offline for `for` (default 0 s: at once); resolved when it says it is online."""

    kind: Literal["offline"]
    for_: Duration = Field(default=0.0, alias="for")


Rule = Annotated[
    ThresholdRule | AbsenceRule | RateRule | StateRule | OfflineRule, Field(discriminator="kind")
]


class RulesFile(_Strict):
    """The rules file: a list of rules with unique ids."""

    rules: list[Rule]

    @model_validator(mode="after")
    def _unique_ids(self) -> RulesFile:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} is used twice")
            seen.add(rule.id)
        return self
