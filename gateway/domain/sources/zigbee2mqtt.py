"""Zigbee2MQTT: `<base_topic>/<friendly_name>` JSON states (https://www.zigbee2mqtt.io)."""

from __future__ import annotations

from typing import Any

from gateway.domain.sources.base import (
    SourceReading,
    device_id_of,
    on_off,
    parse_json_object,
    parse_time,
    presence_word,
)

__all__ = ["Zigbee2Mqtt"]

# Zigbee2MQTT's exposed property -> canonical metric (DESIGN.md's table). `contact`,
# `state`, `running_state` and the two illuminances are read by hand below.
_FIELDS = {
    "temperature": "temperature_c",
    "local_temperature": "temperature_c",
    "humidity": "humidity_pct",
    "pressure": "pressure_hpa",
    "battery": "battery_pct",
    "occupancy": "motion",
    "power": "power_w",
    # Volts on plugs; millivolts on battery sensors, whose types have no voltage_v.
    "voltage": "voltage_v",
    "current": "current_a",
    "energy": "energy_kwh",
    "occupied_heating_setpoint": "setpoint_c",
    # Tuya TRVs name their setpoint so (https://www.zigbee2mqtt.io/devices/TS0601_thermostat.html).
    "current_heating_setpoint": "setpoint_c",
    "co2": "co2_ppm",
    "pm25": "pm2_5_ugm3",
    "voc_index": "voc_index",
}
# Topics under the base topic that are not a device's state.
_NOT_STATES = ("/set", "/get", "/availability")


class Zigbee2Mqtt:
    """Reads the states Zigbee2MQTT publishes for each device (its default JSON output)."""

    name = "zigbee2mqtt"

    def __init__(self, base_topic: str = "zigbee2mqtt", id_prefix: str = "") -> None:
        self.base_topic = base_topic
        self.id_prefix = id_prefix
        self._head = base_topic + "/"

    @property
    def filters(self) -> tuple[str, ...]:
        return (f"{self.base_topic}/#",)

    def device_of(self, topic: str) -> str | None:
        if not topic.startswith(self._head):
            return None
        name = topic[len(self._head) :]
        if not name or name.startswith("bridge/") or name.endswith(_NOT_STATES):
            return None
        if "/set/" in name or "/get/" in name:
            return None  # `<name>/set/<attribute>`: a command, as `<name>/set`
        return device_id_of(name, self.id_prefix)

    def presence_of(self, topic: str) -> str | None:
        if not topic.startswith(self._head) or not topic.endswith("/availability"):
            return None
        name = topic[len(self._head) : -len("/availability")]
        if not name or name == "bridge" or name.startswith("bridge/"):
            return None
        return device_id_of(name, self.id_prefix)

    def presence(self, payload: bytes) -> bool:
        # `{"state":"online"}` since 1.30 (availability's JSON payload); plain words before.
        if payload.lstrip()[:1] == b"{":
            state = parse_json_object(payload, "a Zigbee2MQTT availability").get("state")
            payload = state.encode() if isinstance(state, str) else b"(no state)"
        return presence_word(payload, b"online", b"offline", "a Zigbee2MQTT availability")

    def decode(self, topic: str, payload: bytes) -> list[SourceReading]:
        device_id = self.device_of(topic)
        if device_id is None:
            return []
        state = parse_json_object(payload, "a Zigbee2MQTT state")
        metrics: dict[str, Any] = {}
        origin: dict[str, str] = {}
        ignored: list[str] = []

        def put(metric: str, value: Any, source: str) -> None:
            if value is not None and metric not in metrics:
                metrics[metric] = value
                origin[metric] = source

        for key, value in state.items():
            metric = _FIELDS.get(key)
            if metric is not None:
                put(metric, value, key)
            elif key == "contact":
                # Zigbee2MQTT's `contact: true` means the magnet is near: closed.
                put("open", (not value) if isinstance(value, bool) else value, key)
            elif key == "state":
                put("on", on_off(value), key)
            elif key == "running_state":
                put("heating", value == "heat" if isinstance(value, str) else value, key)
            elif key not in ("illuminance_lux", "illuminance", "last_seen"):
                ignored.append(key)
        # 1.x sends lux as `illuminance_lux` (and a raw `illuminance`); 2.x `illuminance` in lux.
        if "illuminance_lux" in state:
            put("lux", state["illuminance_lux"], "illuminance_lux")
            if "illuminance" in state:
                ignored.append("illuminance")
        elif "illuminance" in state:
            put("lux", state["illuminance"], "illuminance")
        seen = state.get("last_seen")
        ts = parse_time(seen, "last_seen") if seen is not None else None
        return [SourceReading(device_id, metrics, origin, ignored, ts)]
