"""Tasmota: `tele/<topic>/SENSOR`, `tele/<topic>/STATE`, `stat/<topic>/POWER`
(https://tasmota.github.io/docs/MQTT/)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.domain.deadletters import Reason
from gateway.domain.sources.base import (
    HPA_PER_MMHG,
    SourceError,
    SourceReading,
    device_id_of,
    fahrenheit_to_celsius,
    on_off,
    parse_json_object,
    parse_time,
    presence_word,
)

__all__ = ["Tasmota"]

_ENERGY = {
    "Power": "power_w",
    "Voltage": "voltage_v",
    "Current": "current_a",
    "Total": "energy_kwh",
}
_SENSOR = {"Temperature": "temperature_c", "Humidity": "humidity_pct", "Pressure": "pressure_hpa"}
# Message keys that describe the message, not a sensor.
_META = {"Time", "TempUnit", "PressureUnit", "SpeedUnit"}
# Blocks that look like sensors and are not the room's: an ESP32's chip temperature
# (SetOption146).
_NOT_ROOM = {"ESP32"}


# PressureUnit -> its conversion to hPa (SetOption24 switches pressure to mmHg).
_PRESSURE_UNITS: dict[str, Callable[[float], float]] = {
    "hPa": lambda hpa: hpa,
    "mmHg": lambda mmhg: mmhg * HPA_PER_MMHG,
}


def _converted(value: Any, convert: Callable[[float], float]) -> Any:
    """A number converted; anything else as it is, for validation to refuse."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return convert(value)
    return value


class Tasmota:
    """Reads a Tasmota device's telemetry: energy monitoring, sensors and relay state."""

    name = "tasmota"

    def __init__(self, id_prefix: str = "") -> None:
        self.id_prefix = id_prefix

    @property
    def filters(self) -> tuple[str, ...]:
        return ("tele/+/SENSOR", "tele/+/STATE", "stat/+/POWER", "tele/+/LWT")

    def _kind(self, topic: str) -> tuple[str, str] | None:
        parts = topic.split("/")
        if len(parts) != 3 or not parts[1]:
            return None
        kind = (parts[0], parts[2])
        if kind in (("tele", "SENSOR"), ("tele", "STATE"), ("stat", "POWER")):
            return parts[1], parts[2]
        return None

    def device_of(self, topic: str) -> str | None:
        kind = self._kind(topic)
        return device_id_of(kind[0], self.id_prefix) if kind else None

    def presence_of(self, topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 3 and parts[0] == "tele" and parts[1] and parts[2] == "LWT":
            return device_id_of(parts[1], self.id_prefix)
        return None

    def presence(self, payload: bytes) -> bool:
        # The last will Tasmota sets (`Offline`) and what it says once connected (`Online`).
        return presence_word(payload, b"Online", b"Offline", "a Tasmota LWT")

    def decode(self, topic: str, payload: bytes) -> list[SourceReading]:
        kind = self._kind(topic)
        if kind is None:
            return []
        device_id = device_id_of(kind[0], self.id_prefix)
        if kind[1] == "POWER":
            # stat/<topic>/POWER: the relay's new state as plain text (as JSON with
            # SetOption4, https://tasmota.github.io/docs/DeepSleep/), no time.
            text = payload.decode(errors="replace").strip()
            if text.startswith("{"):
                state = parse_json_object(payload, "a Tasmota POWER message").get("POWER")
                return [SourceReading(device_id, {"on": on_off(state)}, {"on": "POWER"})]
            return [SourceReading(device_id, {"on": on_off(text)}, {"on": "POWER"})]
        message = parse_json_object(payload, f"a Tasmota {kind[1]} message")
        metrics: dict[str, Any] = {}
        origin: dict[str, str] = {}
        ignored: list[str] = []
        if kind[1] == "STATE":
            key = "POWER" if "POWER" in message else "POWER1" if "POWER1" in message else None
            if key is not None:
                metrics["on"], origin["on"] = on_off(message[key]), key
            ignored += [k for k in message if k not in _META and k != key]
        else:
            fahrenheit = message.get("TempUnit") == "F"
            unit = message.get("PressureUnit", "hPa")
            to_hpa = _PRESSURE_UNITS.get(unit) if isinstance(unit, str) else None
            for key, value in message.items():
                if key in _META:
                    continue
                if key in _NOT_ROOM:
                    ignored.append(key)
                    continue
                if not isinstance(value, dict):
                    if key in _SENSOR:  # a sensor built into the device (Sonoff SC)
                        value = {key: value}
                        key = "device"
                    else:
                        ignored.append(key)
                        continue
                names = _ENERGY if key == "ENERGY" else _SENSOR
                for field_name, field_value in value.items():
                    metric = names.get(field_name)
                    if metric == "pressure_hpa" and to_hpa is None:
                        metric = None
                    if metric is None or metric in metrics or field_value is None:
                        ignored.append(f"{key}.{field_name}")
                        continue
                    if isinstance(field_value, list) and field_value:
                        # A multi-channel meter gives a list per field: the first channel
                        # is the device's (one metric per reading).
                        field_value = field_value[0]
                    if metric == "temperature_c" and fahrenheit:
                        field_value = _converted(field_value, fahrenheit_to_celsius)
                    elif metric == "pressure_hpa" and to_hpa is not None:
                        field_value = _converted(field_value, to_hpa)
                    metrics[metric], origin[metric] = field_value, f"{key}.{field_name}"
        time = message.get("Time")
        if time is not None and not isinstance(time, str):
            raise SourceError(Reason.SCHEMA, f"Time: not a time: {str(time)[:40]!r}")
        ts = parse_time(time, "Time") if time is not None else None
        return [SourceReading(device_id, metrics, origin, ignored, ts)]
