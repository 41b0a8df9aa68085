"""Home Assistant MQTT discovery: learn entities from their configs, ingest their states
(https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic_core import from_json

from gateway.domain.deadletters import Reason
from gateway.domain.sources.base import (
    HPA_PER_MMHG,
    SourceError,
    SourceReading,
    device_id_of,
    fahrenheit_to_celsius,
    infer_type,
    topic_matches,
)

__all__ = ["Discovered", "Entity", "HomeAssistant"]

_COMPONENTS = ("sensor", "binary_sensor", "switch")
# Discovery's abbreviations of the keys read here.
_ABBREVIATIONS = {
    "stat_t": "state_topic",
    "val_tpl": "value_template",
    "dev_cla": "device_class",
    "unit_of_meas": "unit_of_measurement",
    "dev": "device",
    "ids": "identifiers",
    "pl_on": "payload_on",
    "pl_off": "payload_off",
    "stat_on": "state_on",
    "stat_off": "state_off",
    "uniq_id": "unique_id",
    "p": "platform",
}
Convert = Callable[[float], float]


def _scale(factor: float) -> Convert:
    return lambda value: value * factor


_SAME: Convert = _scale(1)
# sensor device class -> (canonical metric, {unit: conversion}); a unit not listed is not
# learned (its values would be wrong), an absent unit is taken as the canonical one.
_SENSORS: dict[str, tuple[str, dict[str | None, Convert]]] = {
    "temperature": (
        "temperature_c",
        {None: _SAME, "°C": _SAME, "°F": fahrenheit_to_celsius, "K": lambda k: k - 273.15},
    ),
    "humidity": ("humidity_pct", {None: _SAME, "%": _SAME}),
    "pressure": (
        "pressure_hpa",
        {
            None: _SAME,
            "hPa": _SAME,
            "mbar": _SAME,
            "kPa": _scale(10),
            "Pa": _scale(0.01),
            "inHg": _scale(33.8639),
            "mmHg": _scale(HPA_PER_MMHG),
            "psi": _scale(68.9476),
        },
    ),
    "battery": ("battery_pct", {None: _SAME, "%": _SAME}),
    "illuminance": ("lux", {None: _SAME, "lx": _SAME}),
    "power": ("power_w", {None: _SAME, "W": _SAME, "kW": _scale(1000)}),
    "voltage": ("voltage_v", {None: _SAME, "V": _SAME, "mV": _scale(0.001)}),
    "current": ("current_a", {None: _SAME, "A": _SAME, "mA": _scale(0.001)}),
    "energy": (
        "energy_kwh",
        {None: _SAME, "kWh": _SAME, "Wh": _scale(0.001), "MWh": _scale(1000)},
    ),
    "carbon_dioxide": ("co2_ppm", {None: _SAME, "ppm": _SAME}),
    "pm25": ("pm2_5_ugm3", {None: _SAME, "µg/m³": _SAME}),
}
_SENSORS["atmospheric_pressure"] = _SENSORS["pressure"]
_BINARY = {
    "motion": "motion", "occupancy": "motion", "presence": "motion",
    "door": "open", "window": "open", "opening": "open", "garage_door": "open",
}  # fmt: skip
# The value templates real configs use: `{{ value }}`, `{{ value_json.a.b }}`,
# `{{ value_json['a'] }}`, then optionally `| float`, `| int`, `| round(n)`. Read piece by
# piece, each with an anchored pattern that cannot backtrack far: configs come from
# anyone on the broker.
_TEMPLATE_MAX = 256
_PATH = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*(?:'([^']*)'|"([^"]*)")\s*\]""")
_FILTER = re.compile(r"(float|int)(?:\(\s*-?\d+(?:\.\d+)?\s*\))?|round(?:\(\s*(\d{1,2})\s*\))?")
# States Home Assistant itself uses for "no value".
# ('null' sets a sensor to unknown: https://www.home-assistant.io/integrations/sensor.mqtt/).
_NO_VALUE = frozenset({"", "unavailable", "unknown", "None", "null"})


def _template(template: str | None) -> tuple[tuple[str, ...] | None, int | None] | None:
    """(JSON path or None for the raw value, digits to round to) of a supported template;
    None if the template is outside the subset."""
    if template is None:
        return None, None
    text = template.strip()
    if len(text) > _TEMPLATE_MAX or not (text.startswith("{{") and text.endswith("}}")):
        return None
    expression, *filters = (part.strip() for part in text[2:-2].split("|"))
    path: tuple[str, ...] | None = None
    if expression.startswith("value_json"):
        rest, found = expression[len("value_json") :], []
        while rest:
            match = _PATH.match(rest)
            if match is None:
                return None
            found.append(match.group(1) or match.group(2) or match.group(3))
            rest = rest[match.end() :]
        if not found:
            return None
        path = tuple(found)
    elif expression != "value":
        return None
    rounding = None
    for text_filter in filters:
        match = _FILTER.fullmatch(text_filter)
        if match is None:
            return None
        if text_filter.startswith("round"):
            rounding = int(match.group(2) or 0)
    return path, rounding


@dataclass(frozen=True, slots=True)
class Entity:
    """One learned entity: whose device it is, which metric its state gives, and how."""

    config_topic: str
    device_id: str
    state_topic: str
    metric: str
    path: tuple[str, ...] | None
    rounding: int | None
    convert: Convert | None  # numbers; None for on/off states
    payload_on: str
    payload_off: str

    def value(self, payload: bytes, document: Any) -> Any:
        """The entity's value in a state message; None when it has none."""
        if self.path is None:
            raw: Any = payload.decode(errors="replace").strip()
        else:
            raw = document
            for key in self.path:
                if not isinstance(raw, dict) or key not in raw:
                    return None
                raw = raw[key]
        if raw is None or (isinstance(raw, str) and raw.strip() in _NO_VALUE):
            return None
        if self.convert is None:
            text = (
                raw if isinstance(raw, str) else str(raw).upper() if isinstance(raw, bool) else raw
            )
            if text == self.payload_on:
                return True
            if text == self.payload_off:
                return False
            return raw  # refused by validation: a state that is neither
        number = raw
        if isinstance(raw, str):
            try:
                number = float(raw)
            except ValueError:
                return raw  # refused by validation: not a number
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            number = self.convert(number)
            if self.rounding is not None:
                number = round(number, self.rounding)
        return number


@dataclass(frozen=True, slots=True)
class Discovered:
    """What a config message changed: state topics to start and stop reading."""

    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    problem: str | None = None  # why a config was not learned


class HomeAssistant:
    """Learns entities from discovery configs and reads their state topics.

    `learn()` takes each config message (the bridge reads them before its ordered session
    starts, and as they change); `decode()` turns a learned state topic's message into a
    reading of the entity's device. State topics of other configured sources are not
    learned: Zigbee2MQTT publishes discovery for its own topics, read already.
    """

    name = "homeassistant"

    def __init__(
        self,
        discovery_prefix: str = "homeassistant",
        id_prefix: str = "",
        taken: tuple[str, ...] = (),
    ) -> None:
        self.discovery_prefix = discovery_prefix
        self.id_prefix = id_prefix
        self._taken = taken
        self._entities: dict[str, Entity] = {}  # by key: config topic [#component]
        self._keys: dict[str, list[str]] = {}  # a config topic's entity keys
        self._by_state: dict[str, list[Entity]] = {}

    @property
    def filters(self) -> tuple[str, ...]:
        """The learned state topics (the discovery configs are read apart: `config_filters`)."""
        return tuple(self._by_state)

    @property
    def config_filters(self) -> tuple[str, ...]:
        prefix = self.discovery_prefix
        return (f"{prefix}/+/+/config", f"{prefix}/+/+/+/config")

    @property
    def entities(self) -> Mapping[str, Entity]:
        """The learned entities by config topic (a read-only view)."""
        return MappingProxyType(self._entities)

    def device_of(self, topic: str) -> str | None:
        entities = self._by_state.get(topic)
        return entities[0].device_id if entities else None

    def inferred_type(self, device_id: str) -> str | None:
        """The type a discovered device most likely is, from all its entities' metrics."""
        return infer_type({e.metric for e in self._entities.values() if e.device_id == device_id})

    def learn(self, topic: str, payload: bytes) -> Discovered:
        """Apply one discovery config message (empty: its entities are removed)."""
        affected = {self._entities[key].state_topic for key in self._keys.get(topic, ())}
        before = {t for t in affected if t in self._by_state}
        for key in self._keys.pop(topic, ()):
            self._forget(key)
        problems: list[str] = []
        if payload.strip():
            for key, component, config in self._configs(topic, payload, problems):
                try:
                    entity = self._entity(key, component, config)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                self._entities[key] = entity
                self._keys.setdefault(topic, []).append(key)
                self._by_state.setdefault(entity.state_topic, []).append(entity)
                affected.add(entity.state_topic)
        after = {t for t in affected if t in self._by_state}
        return Discovered(
            tuple(sorted(after - before)),
            tuple(sorted(before - after)),
            "; ".join(problems) or None,
        )

    def _configs(
        self, topic: str, payload: bytes, problems: list[str]
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """(entity key, component, expanded config) of each entity a config message holds:
        one, or for device-based discovery (`<prefix>/device/<id>/config`) one per
        component of `cmps`, each with the device's shared options."""
        try:
            document = from_json(payload)
        except ValueError:
            problems.append("config is not JSON")
            return []
        if not isinstance(document, dict):
            problems.append("config is not a JSON object")
            return []
        component = topic[len(self.discovery_prefix) + 1 :].split("/")[0]
        if component != "device":
            return [(topic, component, _expand(document))]
        shared = {k: v for k, v in document.items() if k not in ("cmps", "components")}
        components = document.get("cmps", document.get("components"))
        if not isinstance(components, dict):
            problems.append("device discovery config has no cmps")
            return []
        configs = []
        for name, options in components.items():
            if not isinstance(options, dict):
                continue
            config = _expand({**shared, **options})
            kind = config.get("platform")
            configs.append((f"{topic}#{name}", str(kind), config))
        return configs

    def _forget(self, key: str) -> None:
        entity = self._entities.pop(key, None)
        if entity is None:
            return
        siblings = [e for e in self._by_state[entity.state_topic] if e is not entity]
        if siblings:
            self._by_state[entity.state_topic] = siblings
        else:
            del self._by_state[entity.state_topic]

    def _entity(self, topic: str, component: str, config: dict[str, Any]) -> Entity:
        if component not in _COMPONENTS:
            raise ValueError(f"component {component} is not read (only {', '.join(_COMPONENTS)})")
        device = config.get("device")
        ids = _expand(device).get("identifiers") if isinstance(device, dict) else None
        native = ids[0] if isinstance(ids, list) and ids else ids
        if not isinstance(native, str) or not native:
            # `device` is optional in discovery; an entity without one is its own device.
            native = config.get("unique_id")
        if not isinstance(native, str) or not native:
            raise ValueError("config names no device.identifiers and no unique_id")
        state_topic = config.get("state_topic")
        if not isinstance(state_topic, str) or not state_topic:
            raise ValueError("config has no state_topic")
        if not _is_topic_name(state_topic):
            raise ValueError(f"state topic {state_topic[:80]!r} is not a topic the bridge reads")
        if any(topic_matches(f, state_topic) for f in self._taken):
            raise ValueError(f"state topic {state_topic} is read by another source already")
        template = config.get("value_template")
        parsed = _template(template if isinstance(template, str) else None)
        if parsed is None:
            raise ValueError(f"value template {str(template)[:80]!r} is outside the subset read")
        device_class = config.get("device_class")
        convert: Convert | None = None
        if component == "sensor":
            known = _SENSORS.get(str(device_class))
            if known is None:
                raise ValueError(f"sensor device class {device_class} has no canonical metric")
            metric, units = known
            unit = config.get("unit_of_measurement")
            found = units.get(unit if isinstance(unit, str) else None)
            if found is None:
                raise ValueError(f"unit {unit} of {device_class} is not converted")
            convert = found
        elif component == "binary_sensor":
            binary = _BINARY.get(str(device_class))
            if binary is None:
                raise ValueError(f"binary sensor device class {device_class} has no metric")
            metric = binary
        else:
            metric = "on"
        device_id = device_id_of(native, self.id_prefix)
        sharing = self._by_state.get(state_topic)
        if sharing and sharing[0].device_id != device_id:
            # A message is one device's: its readings keep their order on its worker.
            raise ValueError(f"state topic {state_topic} is {sharing[0].device_id}'s already")
        on = config.get("state_on", config.get("payload_on", "ON"))
        off = config.get("state_off", config.get("payload_off", "OFF"))
        return Entity(
            config_topic=topic,
            device_id=device_id,
            state_topic=state_topic,
            metric=metric,
            path=parsed[0],
            rounding=parsed[1],
            convert=convert,
            payload_on=str(on),
            payload_off=str(off),
        )

    def decode(self, topic: str, payload: bytes) -> list[SourceReading]:
        entities = self._by_state.get(topic)
        if not entities:
            return []
        document: Any = None
        if any(e.path is not None for e in entities):
            try:
                document = from_json(payload, allow_inf_nan=False)
            except ValueError as exc:
                raise SourceError(Reason.MALFORMED, f"not JSON: {exc}") from None
        readings: dict[str, SourceReading] = {}
        for entity in entities:
            value = entity.value(payload, document)
            reading = readings.setdefault(entity.device_id, SourceReading(entity.device_id, {}, {}))
            if value is not None and entity.metric not in reading.metrics:
                reading.metrics[entity.metric] = value
                reading.origin[entity.metric] = entity.config_topic
        return list(readings.values())


# Code points Mosquitto refuses in a topic (mosquitto_validate_utf8): controls and
# non-characters; a topic of the bridge's is also no filter and no `$` system topic.
_NOT_IN_TOPIC = re.compile("[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff#+]")
_TOPIC_MAX = 1024


def _is_topic_name(topic: str) -> bool:
    return (
        len(topic) <= _TOPIC_MAX
        and not topic.startswith("$")
        and _NOT_IN_TOPIC.search(topic) is None
        and topic.isprintable()
    )


def _expand(config: dict[str, Any]) -> dict[str, Any]:
    """The config with full key names, and `~` put into topics that start or end with it."""
    expanded = {_ABBREVIATIONS.get(k, k): v for k, v in config.items()}
    base = expanded.get("~")
    if isinstance(base, str):
        for key, value in expanded.items():
            if key.endswith("_topic") and isinstance(value, str):
                if value.startswith("~"):
                    expanded[key] = base + value[1:]
                elif value.endswith("~"):
                    expanded[key] = value[:-1] + base
    return expanded
