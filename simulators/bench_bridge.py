"""Benchmark: bridge throughput draining a backlog, and latency at a fixed offered load.

    python -m simulators.bench_bridge --readings 100000 --bridges 1

Against the local stack (loopback only). It registers a fleet under topics of its own,
then, with the bridge(s) running as separate processes (`iotgw run bridge`):
1. drain: publishes N readings while the bridges are stopped (their persistent sessions
   queue them), starts the bridges and times until all N are in Kafka;
2. latency: publishes at a fixed rate and measures, per reading, the time from MQTT
   publish to the record being readable from Kafka (an upper bound of publish to
   Kafka acknowledgement).
Prints one JSON object; deletes its topics and sessions afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from gmqtt import Client
from gmqtt.storage import PersistentStorage

from gateway.kafka import ensure_topics, kafka_admin, topic_partitions
from gateway.registry import RegistryWriter
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from schemas import Device, DeviceType

PUBLISHERS = 10


class Fleet:
    """MQTT publishers for `devices` thermostats, QoS 1, each within its in-flight window."""

    def __init__(self, settings: Settings, devices: list[str]) -> None:
        self.settings = settings
        self.devices = devices
        self.sent_at: dict[tuple[str, int], float] = {}
        self._clients: list[tuple[Client, PersistentStorage]] = []

    async def __aenter__(self) -> Fleet:
        for _ in range(PUBLISHERS):
            storage = PersistentStorage()
            client = Client(f"bench-pub-{uuid.uuid4().hex[:8]}", persistent_storage=storage)
            await client.connect(self.settings.mqtt.host, self.settings.mqtt.port)
            self._clients.append((client, storage))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client, storage in self._clients:
            await asyncio.wait_for(storage.wait_empty(), 60)
            await client.disconnect()

    async def publish(self, index: int, seq: int) -> None:
        device_id = self.devices[index % len(self.devices)]
        client, _ = self._clients[index % PUBLISHERS]
        payload = json.dumps(
            {
                "type": "thermostat",
                "ts": time.time_ns() // 1_000_000,
                "seq": seq,
                "metrics": {"temperature_c": 21.5, "humidity_pct": 40.0, "heating": True},
            }
        ).encode()
        while True:
            try:
                client.publish(f"devices/{device_id}/telemetry", payload, qos=1)
                break
            except OverflowError:
                await asyncio.sleep(0.0005)
        self.sent_at[(device_id, seq)] = time.perf_counter()

    async def run(self, count: int, rate: float | None, first_seq: int = 0) -> None:
        """Publish `count` readings round-robin over the devices, paced at `rate` if given."""
        started = time.perf_counter()
        for i in range(count):
            await self.publish(i, first_seq + i // len(self.devices))
            if rate is not None:
                ahead = (i + 1) / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            elif i % 200 == 0:
                await asyncio.sleep(0)


class ReadingsWatch:
    """Consumes iot.readings and notes when each (device, seq) first became readable."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.arrived: dict[Any, float] = {}
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=5,
        )

    async def start(self, *, from_end: bool) -> None:
        """Start reading; `from_end` skips what the topic already holds."""
        await self._consumer.start()
        topic = Topics(self.settings.topic_prefix).readings
        partitions = [TopicPartition(topic, p) for p in await topic_ids(self.settings, topic)]
        self._consumer.assign(partitions)
        if from_end:
            await self._consumer.seek_to_end(*partitions)
            for partition in partitions:
                await self._consumer.position(partition)
        else:
            await self._consumer.seek_to_beginning(*partitions)

    async def until(self, total: int, timeout_s: float) -> dict[Any, float]:
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.arrived) < total:
                    batches = await self._consumer.getmany(timeout_ms=50)
                    now = time.perf_counter()
                    for records in batches.values():
                        for record in records:
                            value = json.loads(record.value)
                            self.arrived.setdefault((value["device_id"], value["seq"]), now)
        finally:
            await self._consumer.stop()
        return self.arrived


async def topic_ids(settings: Settings, topic: str) -> list[int]:
    return await topic_partitions(settings.kafka_bootstrap, topic, settings.timeout_s)


def start_bridges(settings: Settings, count: int, logs: Path) -> list[subprocess.Popen[bytes]]:
    processes = []
    for i in range(count):
        env = {
            **os.environ,
            "IOTGW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "IOTGW_MQTT_URL": settings.mqtt_url.get_secret_value(),
            "IOTGW_TOPIC_PREFIX": settings.topic_prefix,
            "IOTGW_MQTT_SHARE_GROUP": settings.mqtt_share_group,
            "IOTGW_MQTT_CLIENT_ID": f"{settings.mqtt_client_id}-{i}",
            "IOTGW_METRICS_PORT": "0",
            "IOTGW_RATE_LIMIT_PER_S": "100000",
            "IOTGW_RATE_LIMIT_BURST": "100000",
        }
        with (logs / f"bridge-{i}.log").open("ab") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gateway", "run", "bridge"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
    return processes


def wait_started(logs: Path, count: int, starts: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        texts = [(logs / f"bridge-{i}.log").read_text() for i in range(count)]
        if all(t.count("event=bridge_started") >= starts for t in texts):
            return
        time.sleep(0.1)
    raise RuntimeError(f"bridges did not start; see {logs}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(15)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    base = load_settings()
    settings = base.model_copy(
        update={
            "topic_prefix": f"bench{uuid.uuid4().hex[:8]}",
            "mqtt_share_group": f"bench-{uuid.uuid4().hex[:8]}",
            "mqtt_client_id": f"bench-bridge-{uuid.uuid4().hex[:8]}",
        }
    )
    await ensure_topics(settings)
    devices = [f"bench-{i:04d}" for i in range(args.devices)]
    async with RegistryWriter(settings) as writer:
        await writer.put(
            *(Device(device_id=d, type=DeviceType.THERMOSTAT, registered_at=0) for d in devices)
        )
    logs = Path(tempfile.mkdtemp(prefix="iotgw-bench-"))
    result: dict[str, Any] = {"bridges": args.bridges, "devices": args.devices, "logs": str(logs)}
    try:
        # Sessions exist before the backlog is published, so the broker queues for them.
        bridges = start_bridges(settings, args.bridges, logs)
        wait_started(logs, args.bridges, 1)
        stop(bridges)
        async with Fleet(settings, devices) as fleet:
            await fleet.run(args.readings, None)
        watch = ReadingsWatch(settings)
        await watch.start(from_end=False)
        started = time.perf_counter()
        bridges = start_bridges(settings, args.bridges, logs)
        await watch.until(args.readings, 600)
        drain_s = time.perf_counter() - started
        cpu = sum(cpu_seconds(p.pid) for p in bridges)
        result["drain"] = {
            "readings": args.readings,
            "seconds": round(drain_s, 2),
            "readings_per_s": round(args.readings / drain_s),
            "bridge_cpu_s_per_10k": round(cpu / args.readings * 10_000, 2),
            "note": "includes the bridges' start-up (registry load, connections)",
        }
        wait_started(logs, args.bridges, 2)
        for rate in args.rates:
            total = int(rate * args.seconds)
            first_seq = args.readings // len(devices) + 1
            watch = ReadingsWatch(settings)
            await watch.start(from_end=True)
            async with Fleet(settings, devices) as fleet:
                counting = asyncio.create_task(watch.until(total, 300))
                await fleet.run(total, rate, first_seq)
                arrived = await counting
            latencies = sorted(
                (arrived[key] - sent) * 1000
                for key, sent in fleet.sent_at.items()
                if key in arrived
            )
            result[f"latency_at_{int(rate)}_per_s"] = {
                "readings": len(latencies),
                "p50_ms": round(statistics.median(latencies), 2),
                "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
                "max_ms": round(latencies[-1], 2),
            }
            args.readings += total
        stop(bridges)
    finally:
        async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
            await admin.delete_topics([s.name for s in Topics(settings.topic_prefix).specs()])
        for i in range(args.bridges):
            client = Client(f"{settings.mqtt_client_id}-{i}", clean_session=True)
            await client.connect(settings.mqtt.host, settings.mqtt.port)
            await client.disconnect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=100_000, help="backlog to drain")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--bridges", type=int, default=1)
    parser.add_argument("--rates", type=float, nargs="*", default=[5000.0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per latency run")
    print(json.dumps(asyncio.run(bench(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
