"""Shelly Gen2/Gen3: RPC notifications on `<device_id>/events/rpc`
(https://shelly-api-docs.shelly.cloud/gen2/General/Notifications)."""

from __future__ import annotations

from typing import Any

from gateway.domain.deadletters import Reason
from gateway.domain.sources.base import (
    LATEST_MS,
    SourceError,
    SourceReading,
    device_id_of,
    parse_json_object,
    presence_word,
)

__all__ = ["Shelly"]

_METHODS = ("NotifyStatus", "NotifyFullStatus")
LATEST_S = LATEST_MS // 1000
# (component, path inside it) -> canonical metric; the first instance (`:0`) only.
_FIELDS: dict[str, dict[tuple[str, ...], str]] = {
    "switch:0": {
        ("output",): "on",
        ("apower",): "power_w",
        ("voltage",): "voltage_v",
        ("current",): "current_a",
        ("aenergy", "total"): "energy_kwh",
    },
    "temperature:0": {("tC",): "temperature_c"},
    "humidity:0": {("rh",): "humidity_pct"},
    "devicepower:0": {("battery", "percent"): "battery_pct"},
}


def _leaves(value: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    leaves: list[tuple[tuple[str, ...], Any]] = []
    for key, item in value.items():
        if isinstance(item, dict):
            leaves += _leaves(item, (*path, key))
        else:
            leaves.append(((*path, key), item))
    return leaves


class Shelly:
    """Reads the status notifications of Shelly Gen2 and Gen3 devices (switches, plugs, H&T)."""

    name = "shelly"

    def __init__(self, id_prefix: str = "") -> None:
        self.id_prefix = id_prefix

    @property
    def filters(self) -> tuple[str, ...]:
        return ("+/events/rpc", "+/online")

    def device_of(self, topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 3 and parts[0] and parts[1:] == ["events", "rpc"]:
            return device_id_of(parts[0], self.id_prefix)
        return None

    def presence_of(self, topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 2 and parts[0] and parts[1] == "online":
            return device_id_of(parts[0], self.id_prefix)
        return None

    def presence(self, payload: bytes) -> bool:
        # `<id>/online`: `true` once connected, `false` as its last will.
        return presence_word(payload, b"true", b"false", "a Shelly online message")

    def decode(self, topic: str, payload: bytes) -> list[SourceReading]:
        device_id = self.device_of(topic)
        if device_id is None:
            return []
        message = parse_json_object(payload, "a Shelly RPC notification")
        method, params = message.get("method"), message.get("params")
        if not isinstance(method, str) or not isinstance(params, dict):
            raise SourceError(Reason.MALFORMED, "a Shelly notification needs `method` and `params`")
        if method not in _METHODS:
            return []  # NotifyEvent and the like: events, not status
        metrics: dict[str, Any] = {}
        origin: dict[str, str] = {}
        ignored: list[str] = []
        for component, status in params.items():
            if component == "ts":
                continue
            fields = _FIELDS.get(component)
            if fields is None or not isinstance(status, dict):
                ignored.append(component)
                continue
            for path, value in _leaves(status):
                name = ".".join((component, *path))
                metric = fields.get(path)
                if metric is None or value is None:
                    if path != ("id",):
                        ignored.append(name)
                    continue
                if metric == "energy_kwh" and isinstance(value, (int, float)):
                    value = value / 1000  # Shelly counts energy in Wh
                metrics[metric], origin[metric] = value, name
        ts = params.get("ts")
        if ts is None:
            return [SourceReading(device_id, metrics, origin, ignored)]
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not 0 <= ts <= LATEST_S:
            raise SourceError(Reason.SCHEMA, f"params.ts: not a time in seconds: {str(ts)[:40]!r}")
        return [SourceReading(device_id, metrics, origin, ignored, round(ts * 1000))]
