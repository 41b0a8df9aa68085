"""Benchmark: readings per second the rules engine evaluates, with the example rules and
with 100 rules.

    python -m simulators.bench.rules --readings 200000

In one process, without Kafka: each reading is decoded from canonical JSON (as the
engine receives it) and evaluated, through the event-time reorder buffer, against
every rule in scope. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from gateway.domain.rules import RuleEngine
from gateway.domain.rules_file import load_rules
from schemas import Device
from schemas.rules import Rule
from simulators.fleet import FleetTraffic, build_fleet

ROOT = Path(__file__).resolve().parents[1]


def readings(count: int, devices: int) -> tuple[list[bytes], dict[str, Device]]:
    fleet = build_fleet(devices, 5)
    traffic = FleetTraffic(fleet, {}, 5)
    out: list[bytes] = []
    now = 1_795_680_000.0
    while len(out) < count:
        now += 1.0
        for device in fleet:
            for message in traffic.messages(device, now):
                reading = json.loads(message.payload)
                reading["device_id"] = device.device_id
                reading["received_at"] = reading["ts"]
                out.append(json.dumps(reading).encode())
    return out[:count], {d.device_id: d.record() for d in fleet}


def hundred(rules: list[Rule]) -> list[Rule]:
    """Ten variants of each example rule: other ids, thresholds and durations."""
    variants = []
    for i in range(10):
        for rule in rules:
            update: dict[str, Any] = {"id": f"{rule.id}-{i}"}
            if hasattr(rule, "value") and rule.kind == "threshold":
                update["value"] = rule.value * (1 + i / 100)
                update["clear"] = None
            variants.append(rule.model_copy(update=update))
    return variants[:100]


def run(rules: list[Rule], encoded: list[bytes], registry: dict[str, Device]) -> dict[str, Any]:
    engine = RuleEngine(rules, registry.get, grace_ms=5000, devices=registry.values)
    started = time.perf_counter()
    alerts = 0
    for value in encoded:
        reading = json.loads(value)
        alerts += len(engine.evaluate(reading, reading["ts"]))
    seconds = time.perf_counter() - started
    return {
        "rules": len(rules),
        "readings": len(encoded),
        "seconds": round(seconds, 2),
        "readings_per_s": round(len(encoded) / seconds),
        "alerts": alerts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1000)
    args = parser.parse_args()
    encoded, registry = readings(args.readings, args.devices)
    examples = load_rules(ROOT / "rules.yaml").rules
    print(
        json.dumps(
            {
                "example_rules": run(examples, encoded, registry),
                "hundred_rules": run(hundred(examples), encoded, registry),
                "note": "one process, no Kafka: JSON decoding and evaluation only",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
