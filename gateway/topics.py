"""The one place that names topics: Kafka's (under a configurable prefix) and MQTT's."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "MQTT_STATUS_FILTER",
    "MQTT_TELEMETRY_FILTER",
    "TopicSpec",
    "Topics",
    "commands_topic",
    "status_device_id",
    "status_topic",
    "telemetry_device_id",
    "telemetry_topic",
]

# The devices' telemetry on MQTT (DESIGN.md, "MQTT"), as the bridge subscribes to it, and
# their availability (`online`/`offline`, the latter as their last will).
MQTT_TELEMETRY_FILTER = "devices/+/telemetry"
MQTT_STATUS_FILTER = "devices/+/status"


def telemetry_topic(device_id: str) -> str:
    """Where a device publishes its readings."""
    return f"devices/{device_id}/telemetry"


def status_topic(device_id: str) -> str:
    """Where a device says it is online, and its last will says it is offline."""
    return f"devices/{device_id}/status"


def status_device_id(topic: str) -> str | None:
    """The `{device_id}` of `devices/{device_id}/status`, if the topic has that form."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "devices" and parts[2] == "status":
        return parts[1]
    return None


def commands_topic(device_id: str) -> str:
    """Where a device receives commands (the rules engine's `mqtt_command` actions)."""
    return f"devices/{device_id}/commands"


def telemetry_device_id(topic: str) -> str | None:
    """The `{device_id}` of `devices/{device_id}/telemetry`, if the topic has that form."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "devices" and parts[2] == "telemetry":
        return parts[1]
    return None


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: its name, partition count and topic-level configs."""

    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Topics:
    """Topic names of DESIGN.md ("Kafka"), e.g. `iot.readings` for the prefix `iot`."""

    prefix: str = "iot"

    def __post_init__(self) -> None:
        if not self.prefix or any(c not in _TOPIC_CHARS for c in self.prefix):
            raise ValueError(f"invalid topic prefix {self.prefix!r}: use letters, digits, . _ -")

    @property
    def readings(self) -> str:
        return f"{self.prefix}.readings"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}.readings.dlq"

    @property
    def devices(self) -> str:
        return f"{self.prefix}.devices"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}.alerts"

    @property
    def pending(self) -> str:
        """Readings of devices awaiting approval, and what became of them."""
        return f"{self.prefix}.readings.pending"

    @property
    def availability(self) -> str:
        return f"{self.prefix}.availability"

    @property
    def devices_state(self) -> str:
        """Each device's last-known state (compacted)."""
        return f"{self.prefix}.devices.state"

    @property
    def rules_state(self) -> str:
        """The rules engine's state per rule and device (compacted)."""
        return f"{self.prefix}.rules.state"

    def specs(
        self, readings_partitions: int = 6, pending_max_age_s: float = 7 * 24 * 3600
    ) -> list[TopicSpec]:
        """Every topic iotgw uses, as `iotgw topics create` makes them."""
        # Held readings leave the pending topic as dead letters at the maximum age; Kafka
        # keeps them a week longer (as long as the broker keeps a bridge's session), so a
        # bridge that was down meanwhile still finds them.
        kept_s = pending_max_age_s + 7 * 24 * 3600
        pending_retention = {"retention.ms": str(int(kept_s * 1000))}
        return [
            TopicSpec(self.readings, readings_partitions),
            TopicSpec(self.dead_letters, readings_partitions),
            # The registry: one record per device id, kept forever, a tombstone deletes.
            TopicSpec(self.devices, 1, {"cleanup.policy": "compact"}),
            TopicSpec(self.alerts, readings_partitions),
            TopicSpec(self.rules_state, 1, {"cleanup.policy": "compact"}),
            TopicSpec(self.pending, readings_partitions, pending_retention),
            TopicSpec(self.availability, readings_partitions),
            TopicSpec(self.devices_state, readings_partitions, {"cleanup.policy": "compact"}),
        ]


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
