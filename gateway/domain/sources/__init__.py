"""Device sources: the formats devices already speak, read by adapters named in `sources.yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.domain.sources.base import (
    Adapter,
    AvailabilityAdapter,
    SourceError,
    SourceReading,
    device_id_of,
    infer_type,
    topic_matches,
)
from gateway.domain.sources.homeassistant import Discovered, HomeAssistant
from gateway.domain.sources.shelly import Shelly
from gateway.domain.sources.tasmota import Tasmota
from gateway.domain.sources.zigbee2mqtt import Zigbee2Mqtt
from gateway.topics import MQTT_TELEMETRY_FILTER
from schemas.documents import parse_document

__all__ = [
    "Adapter",
    "Discovered",
    "HomeAssistant",
    "SourceError",
    "SourceReading",
    "Sources",
    "SourcesFileError",
    "device_id_of",
    "infer_type",
    "load_sources",
    "parse_sources",
]

_TOPIC_LEVELS = r"^[^#+\x00]+$"
IdPrefix = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{0,32}$")]


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id_prefix: IdPrefix = ""
    # A reading of a device the registry does not know: held for approval or a dead letter
    # (unset: IOTGW_UNKNOWN_DEVICES); `auto_approve` registers such a device by itself once
    # its type is known.
    unknown_devices: Literal["hold", "reject"] | None = None
    auto_approve: bool = False


class Zigbee2MqttSource(_Source):
    adapter: Literal["zigbee2mqtt"]
    base_topic: str = Field(default="zigbee2mqtt", pattern=_TOPIC_LEVELS)


class TasmotaSource(_Source):
    adapter: Literal["tasmota"]


class ShellySource(_Source):
    adapter: Literal["shelly"]


class HomeAssistantSource(_Source):
    adapter: Literal["homeassistant"]
    discovery_prefix: str = Field(default="homeassistant", pattern=_TOPIC_LEVELS)


SourceEntry = Annotated[
    Zigbee2MqttSource | TasmotaSource | ShellySource | HomeAssistantSource,
    Field(discriminator="adapter"),
]


class SourcesFile(BaseModel):
    """`sources.yaml`: the sources the bridge reads besides our own envelope."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[SourceEntry] = Field(default_factory=list)


class SourcesFileError(ValueError):
    """A sources file that cannot be used, with a one-line reason."""


class Sources:
    """The configured adapters, and which of them a topic belongs to."""

    def __init__(self, entries: list[SourceEntry] | None = None) -> None:
        self.adapters: list[Adapter] = []
        self.homeassistant: HomeAssistant | None = None
        # By adapter name: what to do with unknown devices (None: the default), auto-approve.
        self.policies: dict[str, tuple[str | None, bool]] = {
            entry.adapter: (entry.unknown_devices, entry.auto_approve) for entry in entries or []
        }
        # The adapters whose devices say whether they are online (Home Assistant entities'
        # availability topics are not read).
        self.announcing: list[AvailabilityAdapter] = []
        discovery: list[HomeAssistantSource] = []
        for entry in entries or []:
            if isinstance(entry, Zigbee2MqttSource):
                self.announcing.append(Zigbee2Mqtt(entry.base_topic, entry.id_prefix))
            elif isinstance(entry, TasmotaSource):
                self.announcing.append(Tasmota(entry.id_prefix))
            elif isinstance(entry, ShellySource):
                self.announcing.append(Shelly(entry.id_prefix))
            else:
                discovery.append(entry)
        self.adapters += self.announcing
        if len(discovery) > 1:
            raise SourcesFileError("at most one homeassistant source")
        # The filters to subscribe to, fixed for the process (Home Assistant's state topics
        # are learned apart).
        self.filters: tuple[str, ...] = tuple(f for a in self.adapters for f in a.filters)
        if discovery:
            # Topics read already (our envelope's among them) are not learned again: the
            # broker would deliver such a message once per matching subscription.
            taken = (MQTT_TELEMETRY_FILTER, *self.filters)
            entry = discovery[0]
            self.homeassistant = HomeAssistant(entry.discovery_prefix, entry.id_prefix, taken)
            self.adapters.append(self.homeassistant)
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise SourcesFileError("each adapter may be listed once")

    def __bool__(self) -> bool:
        return bool(self.adapters)

    def holding(self, default: str) -> frozenset[str]:
        """The sources (adapter names) whose unknown devices' readings are held for approval,
        `default` being what a source that does not say does."""
        policies = self.policies.items()
        return frozenset(name for name, (policy, _) in policies if (policy or default) == "hold")

    @property
    def auto_approving(self) -> frozenset[str]:
        """The sources whose held devices register themselves once their type is known."""
        return frozenset(name for name, (_, auto) in self.policies.items() if auto)

    def claims(self, topic: str) -> bool:
        """Whether a source subscribes to `topic` (it may still be no device's reading, like
        Zigbee2MQTT's `bridge/...` topics)."""
        # The fixed filters only: a learned state topic that is still an entity's routes.
        return any(topic_matches(f, topic) for f in self.filters)

    def presence_route(self, topic: str) -> tuple[AvailabilityAdapter, str] | None:
        """The adapter whose availability topic `topic` is and the device it is about."""
        for adapter in self.announcing:
            device_id = adapter.presence_of(topic)
            if device_id is not None:
                return adapter, device_id
        return None

    def route(self, topic: str) -> tuple[Adapter, str] | None:
        """The adapter that reads `topic` and the device it is about, if any does."""
        for adapter in self.adapters:
            device_id = adapter.device_of(topic)
            if device_id is not None:
                return adapter, device_id
        return None


def parse_sources(text: str, origin: str = "sources.yaml") -> Sources:
    """The sources of a sources file's text; SourcesFileError with the first problem."""
    try:
        parsed = parse_document(text, SourcesFile, origin, "sources")
    except ValueError as exc:
        raise SourcesFileError(str(exc)) from None
    try:
        return Sources(parsed.sources)
    except SourcesFileError as exc:
        raise SourcesFileError(f"{origin}: {exc}") from None


def load_sources(path: Path) -> Sources:
    """The sources of the file at `path`; none (our envelope only) if there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Sources()
    except OSError as exc:
        raise SourcesFileError(f"cannot read {path}: {exc.strerror}") from None
    return parse_sources(text, str(path))
