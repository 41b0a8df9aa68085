"""The device sources' fixtures (tests/fixtures/sources/): real messages from each project's
documentation and what the bridge must make of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.domain.sources import Sources, parse_sources
from schemas import Device

FIXTURES = Path(__file__).parent / "fixtures" / "sources"
SOURCES = ("zigbee2mqtt", "tasmota", "shelly", "homeassistant")


@dataclass(frozen=True)
class Case:
    """One message of a fixture file and what it must give."""

    kind: str  # "examples", "no_reading", "malformed" or "availability"
    entry: dict[str, Any]

    @property
    def topic(self) -> str:
        return str(self.entry["topic"])

    @property
    def payload(self) -> bytes:
        if "payload_text" in self.entry:
            return str(self.entry["payload_text"]).encode()
        return json.dumps(self.entry["payload"]).encode()

    @property
    def config(self) -> tuple[str, bytes] | None:
        """A Home Assistant entry's discovery config (topic, payload)."""
        if "config_topic" not in self.entry:
            return None
        return self.entry["config_topic"], json.dumps(self.entry["config"]).encode()

    @property
    def device_id(self) -> str | None:
        expected = self.entry.get("expected")
        return expected["device_id"] if expected else None


@dataclass(frozen=True)
class Fixture:
    source: str
    sources_yaml: dict[str, Any]
    cases: list[Case]

    def sources(self) -> Sources:
        entries = [self.sources_yaml]
        for case in self.cases:
            entries += case.entry.get("also_configured", [])
        return parse_sources(json.dumps({"sources": _unique(entries)}))

    def devices(self, sources: Sources) -> list[Device]:
        """A registry record for every device the fixture's messages are about."""
        found: dict[str, Device] = {}
        for case in self.cases:
            config = case.config
            if config is not None and sources.homeassistant is not None:
                sources.homeassistant.learn(*config)
            route = sources.route(case.topic) or sources.presence_route(case.topic)
            device_id = case.device_id or (route[1] if route else None)
            if device_id and device_id not in found:
                found[device_id] = Device(
                    device_id=device_id,
                    type=case.entry["type"],
                    tz=case.entry.get("tz"),
                    registered_at=0,
                )
        return list(found.values())


def _unique(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for entry in entries:
        if entry not in seen:
            seen.append(entry)
    return seen


def load_fixture(source: str) -> Fixture:
    document = json.loads((FIXTURES / f"{source}.json").read_text())
    cases = [
        Case(kind, entry)
        for kind in ("examples", "no_reading", "malformed", "availability")
        for entry in document.get(kind, [])
    ]
    return Fixture(document["source"], document["sources_yaml"], cases)
