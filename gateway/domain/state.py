"""Each device's last-known state: readings and availability records merged, the newest wins.

The merge is per field, by the records' own timestamps: a metric keeps the value of the
newest reading that carried it, `last_seen` and `type` follow the newest reading, `online`
the newest availability record. A late or replayed older record changes nothing it has
no newer value for, so merging the same records again (a restart after a crash, a rebuild
from scratch) gives the same state. Of two records with the same timestamp the later in
the topic wins: a device's records keep their order in its partition, so that is the same
record on every replay.
"""

from __future__ import annotations

from typing import Any, cast

from pydantic_core import from_json

from gateway.domain.records import AvailabilityRecord, CanonicalReading, DeviceState, MetricState

__all__ = ["DeviceStates", "decode_state", "empty_state", "with_availability", "with_reading"]


def empty_state(device_id: str) -> DeviceState:
    """The state of a device nothing was heard from."""
    return {
        "device_id": device_id,
        "type": None,
        "metrics": {},
        "last_seen": None,
        "online": None,
        "online_ts": None,
        "online_since": None,
    }


def with_reading(state: DeviceState, reading: CanonicalReading) -> DeviceState:
    """`state` after `reading`: each metric it carries, unless `state` holds a newer value."""
    ts = reading["ts"]
    metrics = state["metrics"]
    newer: dict[str, MetricState] = {}
    for name, value in reading["metrics"].items():
        held = metrics.get(name)
        if held is None or ts >= held["ts"]:
            newer[name] = {"value": value, "ts": ts}
    last_seen = state["last_seen"]
    newest = last_seen is None or ts >= last_seen
    return {
        **state,
        "type": reading["type"] if newest else state["type"],
        "metrics": {**metrics, **newer} if newer else metrics,
        "last_seen": ts if newest else last_seen,
    }


def with_availability(state: DeviceState, record: AvailabilityRecord) -> DeviceState:
    """`state` after an availability record, unless `state` holds a newer one."""
    ts, online = record["ts"], record["online"]
    if state["online_ts"] is not None and ts < state["online_ts"]:
        return state
    changed = online != state["online"]
    return {
        **state,
        "online": online,
        "online_ts": ts,
        "online_since": ts if changed else state["online_since"],
    }


def decode_state(value: bytes) -> DeviceState:
    """A record of `iot.devices.state`; ValueError if it is not one."""
    state = from_json(value)
    if not (
        isinstance(state, dict)
        and state.keys() >= DeviceState.__required_keys__
        and isinstance(state.get("device_id"), str)
        and isinstance(state.get("type"), str | None)
        and isinstance(metrics := state.get("metrics"), dict)
        and all(_is_metric(metric) for metric in metrics.values())
        and all(_is_ts(state.get(key)) for key in ("last_seen", "online_ts", "online_since"))
        and isinstance(state.get("online"), bool | None)
    ):
        raise ValueError("not a device state")
    return cast(DeviceState, state)


def _is_ts(value: Any) -> bool:
    return value is None or type(value) is int


def _is_metric(metric: Any) -> bool:
    return (
        isinstance(metric, dict)
        and isinstance(metric.get("value"), int | float)  # bool is an int
        and type(metric.get("ts")) is int
    )


class DeviceStates:
    """The state of every device, and which states changed since they were last taken."""

    def __init__(self, states: dict[str, DeviceState] | None = None) -> None:
        self._states: dict[str, DeviceState] = dict(states or {})
        self._changed: set[str] = set()

    def __len__(self) -> int:
        return len(self._states)

    def reading(self, reading: CanonicalReading) -> None:
        device_id = reading["device_id"]
        old = self._states.get(device_id) or empty_state(device_id)
        self._put(old, with_reading(old, reading))

    def availability(self, record: AvailabilityRecord) -> None:
        device_id = record["device_id"]
        old = self._states.get(device_id) or empty_state(device_id)
        self._put(old, with_availability(old, record))

    def _put(self, old: DeviceState, new: DeviceState) -> None:
        if new != old:
            self._states[new["device_id"]] = new
            self._changed.add(new["device_id"])

    def take_changed(self) -> dict[str, DeviceState]:
        """The states that changed since the last call, by device id."""
        changed, self._changed = self._changed, set()
        return {device_id: self._states[device_id] for device_id in sorted(changed)}
