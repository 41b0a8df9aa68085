"""Benchmark: readings per second the rules engine evaluates, with the example rules and
with 100 rules, in one process and as `iotgw run rules` consuming from Kafka.

    python -m simulators.bench.rules --readings 200000

In one process, without Kafka: each reading is decoded from canonical JSON (as the
engine receives it) and evaluated, through the event-time reorder buffer, against
every rule in scope. From Kafka (against the local stack): the readings are produced to
topics of their own, the fleet is registered, and `iotgw run rules` with 100 rules and
its default settings is timed until its group has committed every reading. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from aiokafka.admin import AIOKafkaAdminClient
from pydantic_core import from_json

from gateway.adapters.kafka import ensure_topics, kafka_admin, produce, read_topic
from gateway.clock import now_ms
from gateway.domain.rules import RuleEngine, decode_reading
from gateway.domain.rules_file import load_rules
from gateway.services.registry import RegistryWriter
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from schemas import Device
from schemas.rules import Rule
from simulators.bench.writer import BULK
from simulators.fleet import FleetTraffic, build_fleet
from simulators.processes import ServiceProcess, usage

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 1000
AIM_READINGS_PER_S = 50_000
# How long the engine may take to commit every reading before the run is called failed.
_LIMIT_S = 600.0
# Readings a batch of the in-process run: about what one fetch of the service brings.
_BATCH = 5000
# How often the benchmark asks Kafka for the engine's committed offsets.
_POLL_S = 0.1


def readings(
    count: int, devices: int, *, end_ms: int = 1_795_680_000_000
) -> tuple[list[bytes], dict[str, Device]]:
    """`count` canonical readings of a simulated fleet, one a second per device, the last
    ones at `end_ms`; and the fleet's registry."""
    fleet = build_fleet(devices, 5)
    traffic = FleetTraffic(fleet, {}, 5)
    out: list[bytes] = []
    now = end_ms / 1000 - count / devices - 1
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
    """Decode and evaluate `encoded` in batches as the service does, in this process; the
    wall clock is the batch's newest event time."""
    engine = RuleEngine(rules, registry.get, grace_ms=5000, devices=registry.values)
    started = time.perf_counter()
    alerts = 0
    for start in range(0, len(encoded), _BATCH):
        batch = [decode_reading(value) for value in encoded[start : start + _BATCH]]
        alerts += len(engine.evaluate_batch(batch, batch[-1]["ts"]))
    seconds = time.perf_counter() - started
    return {
        "rules": len(rules),
        "readings": len(encoded),
        "seconds": round(seconds, 2),
        "readings_per_s": round(len(encoded) / seconds),
        "alerts": alerts,
    }


def rules_file(path: Path) -> list[Rule]:
    """Write the 100 rules (variants of rules.yaml's, actions left out) to `path`."""
    rules = [
        r.model_copy(update={"actions": []}) for r in hundred(load_rules(ROOT / "rules.yaml").rules)
    ]
    path.write_text(
        yaml.safe_dump(
            {"rules": [r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in rules]}
        )
    )
    return rules


async def fill(settings: Settings, encoded: list[bytes], registry: dict[str, Device]) -> None:
    """Register the fleet and produce the readings, keyed by device, to iot.readings."""
    async with RegistryWriter(settings) as writer:
        await writer.put(*registry.values())
    records = [(from_json(value)["device_id"].encode(), value) for value in encoded]
    await produce(settings, Topics(settings.topic_prefix).readings, records, **BULK)


async def committed(admin: AIOKafkaAdminClient, group: str) -> int:
    """Readings `group` has committed, all partitions together."""
    offsets = await admin.list_consumer_group_offsets(group)
    return sum(meta.offset for meta in offsets.values() if meta.offset > 0)


async def count_alerts(settings: Settings) -> int:
    """Alerts in iot.alerts, committed ones only."""
    found = 0

    def add(records: list[Any]) -> None:
        nonlocal found
        found += len(records)

    await read_topic(settings, Topics(settings.topic_prefix).alerts, add, committed_only=True)
    return found


async def measure(
    settings: Settings, count: int, logs: Path, report: Callable[[str], None]
) -> dict[str, Any]:
    """`iotgw run rules` with 100 rules on `count` readings in Kafka: readings/s from its
    start until its group committed every reading, and from its first commit (start-up
    left out); CPU per 100,000 readings, peak memory, alerts. Uses topics and a group of
    its own, deleted afterwards."""
    suffix = uuid.uuid4().hex[:8]
    own = settings.model_copy(
        update={
            "topic_prefix": f"rbench{suffix}",
            "rules_group": f"rbench-{suffix}",
            "rules_instance_id": f"rbench-{suffix}",
            "rules_file": logs / f"rules-bench-{suffix}.yaml",
        }
    )
    rules = rules_file(own.rules_file)
    report(f"rules: producing {count} readings of {DEVICES} devices to Kafka")
    encoded, registry = readings(count, DEVICES, end_ms=now_ms())
    await ensure_topics(own)
    try:
        await fill(own, encoded, registry)
        report(f"rules: `iotgw run rules` with {len(rules)} rules consuming them")
        engine = ServiceProcess("rules", own, logs / "rules.log")
        started = time.perf_counter()
        engine.start()
        first: tuple[float, int] | None = None
        done = 0
        try:
            async with kafka_admin(own.kafka_bootstrap, own.timeout_s) as admin:
                while done < count:
                    if engine.process.poll() is not None:
                        raise RuntimeError(f"the rules engine exited; see {engine.log}")
                    if time.perf_counter() - started > _LIMIT_S:
                        raise RuntimeError(f"the rules engine committed {done} of {count}")
                    done = await committed(admin, own.rules_group)
                    if done and first is None:
                        first = (time.perf_counter() - started, done)
                        report(f"rules: first commit after {first[0]:.1f} s")
                    await asyncio.sleep(_POLL_S)
            seconds = time.perf_counter() - started
            cpu, peak_mb = usage(engine.pid)
        finally:
            engine.stop()
        alerts = await count_alerts(own)
    finally:
        async with kafka_admin(own.kafka_bootstrap, own.timeout_s) as admin:
            await admin.delete_topics([s.name for s in Topics(own.topic_prefix).specs()])
        own.rules_file.unlink(missing_ok=True)
    # From the first commit on: the evaluation rate, start-up (imports, registry, group
    # join) left out; a run too short to see two commits falls back to the whole time.
    first_s, first_done = first or (0.0, 0)
    if first_done < count and seconds - first_s > _POLL_S:
        per_s = round((count - first_done) / (seconds - first_s))
    else:
        per_s = round(count / seconds)
    return {
        "rules": len(rules),
        "readings": count,
        "seconds": round(seconds, 2),
        "readings_per_s": per_s,
        "readings_per_s_with_startup": round(count / seconds),
        "startup_s": round(first_s, 2),
        "cpu_s_per_100k": round(cpu / count * 100_000, 2),
        "rss_mb": round(peak_mb, 1),
        "alerts": alerts,
        "aim_readings_per_s": AIM_READINGS_PER_S,
        "aim_met": per_s >= AIM_READINGS_PER_S,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=DEVICES)
    args = parser.parse_args()
    encoded, registry = readings(args.readings, args.devices)
    examples = load_rules(ROOT / "rules.yaml").rules
    result: dict[str, Any] = {
        "example_rules": run(examples, encoded, registry),
        "hundred_rules": run(hundred(examples), encoded, registry),
        "note": "in one process, no Kafka: JSON decoding and evaluation only",
    }
    logs = Path(tempfile.mkdtemp(prefix="iotgw-rbench-"))
    result["kafka"] = asyncio.run(
        measure(load_settings(), args.readings, logs, lambda line: print(line, file=sys.stderr))
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
