"""The benchmark harness: iotgw against the raw ceiling and a naive bridge, in one run.

`iotgw bench` (and `make bench`) on the local stack, loopback only. For the same
pre-generated readings (the simulator's fleet, 100 devices, QoS 1) and each of
`raw_pipe` (mosquitto_sub | Kafka's console producer), `naive_bridge` (paho-mqtt + kafka-python, one
synchronous send per message), `iotgw_1`, `iotgw_2` and `iotgw_3` (the bridge with one, two
or three worker processes behind its one MQTT session; by default 1 and 2):
the drain rate of a backlog preloaded into the subject's persistent session, the rate of
readings published live, the latency from MQTT publish to the record being readable from
Kafka at fixed rates, CPU seconds per 10,000 readings, peak RSS and readings lost. Then
the writer's points/s into InfluxDB 1.6.7 (the stack's) and into InfluxDB 2.7 (the one
the tests run on port 8096, started if needed; skipped, said in one line, where it cannot
be built), each beside that server's own ceiling, and the rules engine's readings/s.
Results go to `<out>/latest.json` and a chart to `<out>/latest.png`.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import NewTopic
from gmqtt import Client
from gmqtt.storage import PersistentStorage
from pydantic_core import from_json
from rich.table import Table

from devstack.installer import ensure_debian_packages, ensure_kafka, kafka_version
from devstack.stack import LOCAL_TEMPLATES
from gateway.adapters.kafka import create_consumer, ensure_topics, kafka_admin, topic_partitions
from gateway.adapters.mqtt import publish_in_window
from gateway.clock import now_ms
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.validation import Accepted, ReadingValidator
from gateway.errors import IotgwError
from gateway.services.registry import RegistryWriter
from gateway.settings import Settings
from gateway.topics import MQTT_TELEMETRY_FILTER, Topics
from simulators.bench import rules as rules_bench
from simulators.bench import writer as writer_bench
from simulators.bench.profile import Recording
from simulators.bench.telegraf import config as telegraf_config
from simulators.bench.telegraf import ensure_telegraf
from simulators.fleet import FleetTraffic, build_fleet
from simulators.processes import ServiceProcess, usage

DEVICES = 100
PUBLISHERS = 10
# A subject that has not finished its drain by then is reported as behind.
DRAIN_LIMIT_S = 90.0
# How long the broker keeps a measured subject's session once it is gone: long enough for
# the preload, short enough that a run killed halfway does not leave a session queueing
# every later reading for long (the run removes its sessions when it ends normally).
SESSION_EXPIRY_S = 300
Report = Callable[[str], None]
# The results' keys of the writer's runs: into the stack's InfluxDB (1.6.7), and into 2.7.
WRITERS = ("writer", "writer_influxdb2")


@dataclass(frozen=True)
class Reading:
    topic: str
    payload: bytes
    key: tuple[str, int]


def pregenerate(count: int, seed: int = 7) -> list[Reading]:
    """`count` valid readings of the simulator's fleet, round-robin over its devices."""
    fleet = build_fleet(DEVICES, seed)
    traffic = FleetTraffic(fleet, {}, seed, first_seq=now_ms())
    out: list[Reading] = []
    now = time.time()
    while len(out) < count:
        for device in fleet:
            for message in traffic.messages(device, now):
                sent = message.readings[0]
                out.append(Reading(message.topic, message.payload, (sent.device_id, sent.seq)))
        now += 0.01
    return out[:count]


class Publisher:
    """QoS 1 publishers for pre-generated readings; records when each was published."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sent_at: dict[tuple[str, int], float] = {}
        self._clients: list[tuple[Client, PersistentStorage]] = []

    async def __aenter__(self) -> Publisher:
        for _ in range(PUBLISHERS):
            storage = PersistentStorage()
            client = Client(f"bench-pub-{uuid.uuid4().hex[:8]}", persistent_storage=storage)
            await client.connect(self.settings.mqtt.host, self.settings.mqtt.port)
            self._clients.append((client, storage))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client, storage in self._clients:
            await asyncio.wait_for(storage.wait_empty(), 120)
            await client.disconnect()

    async def run(self, readings: list[Reading], rate: float | None = None) -> None:
        started = time.perf_counter()
        for i, reading in enumerate(readings):
            client = self._clients[hash(reading.key[0]) % PUBLISHERS][0]
            await publish_in_window(client, reading.topic, reading.payload)
            self.sent_at[reading.key] = time.perf_counter()
            if rate is not None:
                ahead = (i + 1) / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            elif i % 500 == 0:
                await asyncio.sleep(0)


class Watch:
    """Reads a subject's Kafka topic; when each (device, seq) first became readable."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings, self.topic = settings, topic
        self.arrived: dict[tuple[str, int], float] = {}
        self.records = 0
        self._consumer = create_consumer(settings, fetch_max_wait_ms=5)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watch:
        await self._consumer.start()
        ids = await topic_partitions(self.settings, self.topic)
        partitions = [TopicPartition(self.topic, p) for p in ids]
        self._consumer.assign(partitions)
        await self._consumer.seek_to_beginning(*partitions)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    self.records += 1
                    value = from_json(record.value)
                    key = record.key.decode() if record.key else ""
                    device = value.get("device_id") or (key.split("/")[1] if "/" in key else key)
                    # Telegraf's JSON puts the reading's numbers under "fields".
                    seq = value["seq"] if "seq" in value else value["fields"]["seq"]
                    self.arrived.setdefault((device, seq), now)

    async def until(self, keys: set[tuple[str, int]], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not keys <= self.arrived.keys():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def unlimited(settings: Settings, client_id: str, session_expiry_s: int) -> Settings:
    """A measured bridge's settings: no rate limit (the load is the point), any metrics port."""
    return settings.model_copy(
        update={
            "mqtt_client_id": client_id,
            "mqtt_session_expiry_s": session_expiry_s,
            "metrics_port": 0,
            "rate_limit_per_s": 1_000_000.0,
            "rate_limit_burst": 1_000_000,
        }
    )


@dataclass
class Subject:
    """A system under test: its processes, the topic it writes, how to start it."""

    name: str
    settings: Settings
    topic: str
    logs: Path
    binary: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def measured(self) -> Settings:
        """The subject's settings: its own session, no rate limit."""
        return unlimited(self.settings, self.client_id, SESSION_EXPIRY_S)

    @property
    def client_id(self) -> str:
        return self.settings.mqtt_client_id

    async def start(self) -> None:
        log = (self.logs / f"{self.name}.log").open("ab")
        s = self.settings
        if self.name == "raw_pipe":
            # stdbuf: mosquitto_sub's output into a pipe would otherwise sit in a 4 KiB buffer.
            sub = subprocess.Popen(
                ["stdbuf", "-oL", "mosquitto_sub", "-h", s.mqtt.host, "-p", str(s.mqtt.port),
                 "-V", "mqttv5", "-c", "-x", str(SESSION_EXPIRY_S), "-i", self.client_id, "-q", "1",
                 "-t", MQTT_TELEMETRY_FILTER, "-F", "%t|%p"],
                stdout=subprocess.PIPE, stderr=log,
            )  # fmt: skip
            # Kafka's own console producer, the Java twin of kcat: Debian's kcat 1.7.1 holds
            # piped input until it has 1 MiB or the pipe closes (kcat issue #343).
            producer = subprocess.Popen(
                [*kafka_tool("ConsoleProducer", self.logs, print),
                 "--bootstrap-server", s.kafka_bootstrap, "--topic", self.topic,
                 "--reader-property", "parse.key=true", "--reader-property", "key.separator=|",
                 "--command-property", "acks=all", "--command-property", "linger.ms=5"],
                stdin=sub.stdout, stdout=log, stderr=log,
            )  # fmt: skip
            assert sub.stdout is not None
            sub.stdout.close()
            self.processes = [sub, producer]
            await asyncio.sleep(3)  # neither says when it is ready: the JVM starts in ~2 s
        elif self.name in ("naive_bridge", "telegraf"):
            # Neither has a health endpoint: each says when it has connected, then
            # subscribes (paho in its own thread, Telegraf right after).
            if self.name == "naive_bridge":
                marker = "event=naive_bridge_started"
                command = [sys.executable, "-m", "simulators.bench.baselines.naive_bridge"]
            else:
                assert self.binary is not None
                marker = "I! [inputs.mqtt_consumer] Connected"
                conf = self.logs / "telegraf.conf"
                conf.write_text(telegraf_config(self.measured, self.topic))
                command = [str(self.binary), "--config", str(conf)]
            path = self.logs / f"{self.name}.log"
            before = path.read_text().count(marker) if path.exists() else 0
            self.processes = [
                subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **self.measured.environment()},
                )
            ]
            deadline = time.monotonic() + 60
            while path.read_text().count(marker) < before + 1:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                    raise IotgwError(f"{self.name} did not start; see {path}")
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
        else:
            workers = self.name.removeprefix("iotgw_")
            bridge = ServiceProcess(
                "bridge", self.measured, self.logs / f"{self.name}.log", "--workers", workers
            ).start()
            self.processes = [bridge.process]
            await bridge.ready()
        log.close()

    def usage(self) -> tuple[float, float]:
        stats = [usage(p.pid) for p in self.processes]
        return sum(c for c, _ in stats), max((r for _, r in stats), default=0.0)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


def _latency(
    watch: Watch, sent_at: dict[tuple[str, int], float], keys: list[tuple[str, int]]
) -> dict[str, Any]:
    values = sorted((watch.arrived[k] - sent_at[k]) * 1000 for k in keys if k in watch.arrived)
    if not values:
        return {"readings": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "readings": len(values),
        "p50_ms": round(statistics.median(values), 2),
        "p99_ms": round(values[max(0, int(len(values) * 0.99) - 1)], 2),
        "max_ms": round(values[-1], 2),
    }


async def measure(
    subject: Subject,
    readings: list[Reading],
    live: int,
    rates: list[float],
    seconds: float,
    report: Report,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Drain, live and latency figures of one subject; with `profile`, where its drain's
    time went (py-spy's samples written there)."""
    backlog = readings[: len(readings) - live - sum(int(r * seconds) for r in rates)]
    rest = readings[len(backlog) :]
    report(f"{subject.name}: creating its session, then preloading {len(backlog)} readings")
    await subject.start()
    subject.stop()
    async with Publisher(subject.settings) as publisher:
        await publisher.run(backlog)
    async with Watch(subject.settings, subject.topic) as watch:
        report(f"{subject.name}: draining the backlog")
        started = time.perf_counter()
        await subject.start()
        cpu_at_start, _ = subject.usage()
        recording = Recording(subject.processes[0].pid, profile) if profile else None
        finished = await watch.until({r.key for r in backlog}, DRAIN_LIMIT_S)
        drain_s = time.perf_counter() - started
        stages = recording.stop() if recording else None
        times = sorted(watch.arrived[r.key] for r in backlog if r.key in watch.arrived)
        drained = len(times)
        # The drain rate is the backlog over the time from its first reading in Kafka to its
        # last: the subject's speed, not its start-up (Telegraf starts in 0.1 s, the
        # bridge in about 2: two Python processes, the registry read from Kafka).
        steady_s = times[-1] - times[0] if drained > 1 else drain_s
        cpu, _ = subject.usage()
        result: dict[str, Any] = {
            "name": subject.name,
            "readings_per_s": round(drained / max(steady_s, 1e-3)),
            "drain": {
                "readings": drained,
                "of": len(backlog),
                "seconds": round(drain_s, 2),
                "startup_s": round(times[0] - started, 2) if times else None,
                "readings_per_s_with_startup": round(drained / drain_s),
                "finished": finished,
            },
            # Its CPU from when it was started and ready (imports, registry, connections
            # done) to the end of the drain.
            "cpu_s_per_10k": round((cpu - cpu_at_start) / max(drained, 1) * 10_000, 2),
        }
        if stages is not None:
            result["profile"] = stages
        if finished:
            report(f"{subject.name}: publishing {live} readings live")
            live_readings, rest = rest[:live], rest[live:]
            async with Publisher(subject.settings) as publisher:
                started = time.perf_counter()
                await publisher.run(live_readings)
            done = await watch.until({r.key for r in live_readings}, DRAIN_LIMIT_S)
            result["live_readings_per_s"] = (
                round(len(live_readings) / (time.perf_counter() - started)) if done else None
            )
            latency: dict[str, Any] = {}
            for rate in rates:
                batch, rest = rest[: int(rate * seconds)], rest[int(rate * seconds) :]
                report(f"{subject.name}: latency at {rate:g} readings/s")
                async with Publisher(subject.settings) as publisher:
                    await publisher.run(batch, rate)
                await watch.until({r.key for r in batch}, 60)
                latency[str(int(rate))] = _latency(watch, publisher.sent_at, [r.key for r in batch])
            result["latency"] = latency
            top = latency.get("5000") or latency.get(str(int(rates[-1]))) if rates else {}
            result.update({k: (top or {}).get(k) for k in ("p50_ms", "p99_ms", "max_ms")})
            published = {r.key for r in readings}
            await watch.until(published, 30)
            result["lost"] = len(published - watch.arrived.keys())
            result["duplicates"] = watch.records - len(watch.arrived)
        else:
            result.update(
                {
                    "live_readings_per_s": None,
                    "latency": {},
                    "p50_ms": None,
                    "p99_ms": None,
                    "max_ms": None,
                    "lost": None,
                }
            )
        result["rss_mb"] = round(subject.usage()[1], 1)
    subject.stop()
    return result


async def mosquitto_ceiling(
    settings: Settings, readings: list[Reading], logs: Path, report: Report
) -> dict[str, Any]:
    """Mosquitto's own drain rate: `mosquitto_sub` (QoS 1, persistent session) to /dev/null."""
    command = [
        "mosquitto_sub", "-h", settings.mqtt.host, "-p", str(settings.mqtt.port), "-V", "mqttv5",
        "-c", "-x", str(SESSION_EXPIRY_S), "-i", settings.mqtt_client_id, "-q", "1",
        "-t", MQTT_TELEMETRY_FILTER,
    ]  # fmt: skip
    report(f"mosquitto_sub: creating its session, then preloading {len(readings)} readings")
    with (logs / "mosquitto_sub.log").open("ab") as log:
        subprocess.run([*command, "-E"], stderr=log, check=True, timeout=30)
        try:
            async with Publisher(settings) as publisher:
                await publisher.run(readings)
            report("mosquitto_sub: draining the backlog")
            started = time.perf_counter()
            drain = subprocess.Popen(
                [*command, "-C", str(len(readings))], stdout=subprocess.DEVNULL, stderr=log
            )
            try:
                drain.wait(DRAIN_LIMIT_S)
            except subprocess.TimeoutExpired:
                drain.kill()
            seconds = time.perf_counter() - started
        finally:
            await forget_sessions(settings, [settings.mqtt_client_id])
    finished = drain.wait() == 0
    return {
        "name": "mosquitto_sub",
        "readings": len(readings),
        "seconds": round(seconds, 2),
        "readings_per_s": round(len(readings) / seconds) if finished else None,
        "finished": finished,
    }


async def kafka_ceiling(
    settings: Settings, readings: list[Reading], topic: str, logs: Path, report: Report
) -> dict[str, Any]:
    """Kafka's own produce rate: its ProducerPerformance tool, acks=all, records of the
    canonical reading's mean size, as fast as it can, into a topic like iot.readings."""
    size = round(statistics.fmean(canonical_sizes(readings[:1000])))
    tool = kafka_tool("ProducerPerformance", logs, report)
    report(f"kafka ProducerPerformance: {len(readings)} records of {size} bytes, acks=all")
    done = subprocess.run(
        [*tool, "--topic", topic,
         "--num-records", str(len(readings)), "--record-size", str(size), "--throughput", "-1",
         "--producer-props", f"bootstrap.servers={settings.kafka_bootstrap}", "acks=all"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (logs / "producer-performance.log").write_text(done.stdout + done.stderr)
    # Its last line: "N records sent, R records/sec (M MB/sec), A ms avg latency, ..."
    summary = [line for line in done.stdout.splitlines() if " records sent, " in line]
    if done.returncode or not summary:
        raise IotgwError(f"Kafka's ProducerPerformance failed; see {logs}/producer-performance.log")
    rate = float(summary[-1].split(", ")[1].split()[0])
    return {
        "name": "kafka_producer_perf",
        "readings": len(readings),
        "record_bytes": size,
        "readings_per_s": round(rate),
        "summary": summary[-1],
    }


def kafka_tool(name: str, logs: Path, report: Report) -> list[str]:
    """The command that runs one of Kafka's own tools (org.apache.kafka.tools) from the
    stack's jars, with the stack's quiet logging."""
    kafka = ensure_kafka(LOCAL_TEMPLATES / "pom.xml", logs / "install.log", report)
    log4j = f"-Dlog4j2.configurationFile={LOCAL_TEMPLATES / 'log4j2.yaml'}"
    return ["java", "-Xmx512m", log4j, "-cp", kafka.classpath, f"org.apache.kafka.tools.{name}"]


def canonical_sizes(readings: list[Reading]) -> list[int]:
    """The sizes of the records iot.readings holds for `readings`, made by the bridge's
    own validator (no registry, no rate limit)."""
    validator = ReadingValidator(
        lambda _: None,
        require_registration=False,
        max_age_ms=2**62,
        limiter=RateLimiter(float(len(readings)), len(readings)),
    )
    received_at = now_ms()
    return [
        len(outcome.value)
        for r in readings
        for outcome in validator.process(r.topic, r.payload, received_at)
        if isinstance(outcome, Accepted)
    ]


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    mosquitto = subprocess.run(
        ["mosquitto", "-h"], capture_output=True, text=True
    ).stdout.splitlines()[:1]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(int(memory) / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "kafka": kafka_version(LOCAL_TEMPLATES / "pom.xml"),
        "mosquitto": mosquitto[0] if mosquitto else None,
        "date": time.strftime("%Y-%m-%d"),
    }


async def bench(
    base: Settings,
    *,
    readings: int,
    live: int,
    rates: list[float],
    seconds: float,
    runs: list[str],
    out: Path,
    report: Report,
    profile: bool = False,
) -> dict[str, Any]:
    """The ceilings, every run one after the other on the same pre-generated readings,
    then the writer (into InfluxDB 1.x and 2.7) and the rules engine; the figures against
    the aims."""
    out.mkdir(parents=True, exist_ok=True)
    ensure_debian_packages(["mosquitto_sub"], out / "install.log", report)
    total = readings + live + sum(int(r * seconds) for r in rates)
    report(f"generating {total} readings of {DEVICES} devices")
    pregenerated = pregenerate(total)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "ceilings": [], "runs": []}
    results["ceilings"] = await ceilings(base, pregenerated[:readings], logs, report)
    for name in runs:
        suffix = uuid.uuid4().hex[:8]
        settings = base.model_copy(update={
            "topic_prefix": f"bench{suffix}", "mqtt_client_id": f"bench-{name}-{suffix}",
        })  # fmt: skip
        topics = Topics(settings.topic_prefix)
        await ensure_topics(settings)
        topic = topics.readings
        binary = None
        if name == "telegraf":
            binary = ensure_telegraf(out / "install.log", report)
            if binary is None:
                continue
        if name in ("raw_pipe", "naive_bridge", "telegraf"):
            topic = f"{settings.topic_prefix}.{name}"
            async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
                await admin.create_topics([NewTopic(topic, settings.readings_partitions, 1)])
        else:
            fleet = build_fleet(DEVICES, 7)
            async with RegistryWriter(settings) as writer:
                await writer.put(*(device.record() for device in fleet))
        subject = Subject(name, settings, topic, logs, binary)
        try:
            spied = out / f"profile-{name}.txt" if profile and name.startswith("iotgw") else None
            results["runs"].append(
                await measure(subject, pregenerated, live, rates, seconds, report, spied)
            )
        finally:
            subject.stop()
            await forget_sessions(settings, [subject.client_id])
            async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
                await admin.delete_topics(
                    [s.name for s in topics.specs()] + ([topic] if topic != topics.readings else [])
                )
    results["writer"] = await writer_bench.measure(base, readings, logs, report)
    async with writer_bench.influxdb2(base, out / "install.log", report) as influxdb2:
        if influxdb2 is not None:
            results["writer_influxdb2"] = await writer_bench.measure(
                influxdb2, readings, logs, report
            )
    results["rules"] = await rules_bench.measure(base, readings, logs, report)
    results["aims"] = aims(results)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, out / "latest.png")
    return results


async def ceilings(
    base: Settings, readings: list[Reading], logs: Path, report: Report
) -> list[dict[str, Any]]:
    """Mosquitto's drain rate and Kafka's produce rate on this machine, now."""
    suffix = uuid.uuid4().hex[:8]
    settings = base.model_copy(update={"mqtt_client_id": f"bench-ceiling-{suffix}"})
    topic = f"bench{suffix}.producer-performance"
    found = [await mosquitto_ceiling(settings, readings, logs, report)]
    async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
        await admin.create_topics([NewTopic(topic, settings.readings_partitions, 1)])
    try:
        found.append(await kafka_ceiling(settings, readings, topic, logs, report))
    finally:
        async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
            await admin.delete_topics([topic])
    return found


def aims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #16's aims, each with the figure of this run and whether it is met."""
    by_name = {run["name"]: run for run in results["runs"]}
    iotgw, telegraf = by_name.get("iotgw_1"), by_name.get("telegraf")
    found: list[dict[str, Any]] = []

    def aim(what: str, figure: float | None, target: float | None, met: bool) -> None:
        found.append({"aim": what, "figure": figure, "target": target, "met": met})

    if iotgw and telegraf:
        drain, target = iotgw["readings_per_s"], 1.5 * telegraf["readings_per_s"]
        aim("bridge drain >= 1.5x Telegraf's (readings/s)", drain, target, drain >= target)
        cpu, theirs = iotgw["cpu_s_per_10k"], telegraf["cpu_s_per_10k"]
        aim("bridge CPU per reading <= Telegraf's (CPU s per 10k)", cpu, theirs, cpu <= theirs)
    if iotgw:
        p99 = (iotgw.get("latency", {}).get("5000") or {}).get("p99_ms")
        aim("bridge p99 publish-to-Kafka at 5,000/s (ms)", p99, 25, p99 is not None and p99 < 25)
    for writer in writers(results):
        aim(
            f"writer points/s into {influx_name(writer)} (min of 100,000 and 80% of its ceiling)",
            writer["points_per_s"],
            writer["aim_points_per_s"],
            writer["aim_met"],
        )
    rules = results["rules"]
    aim(
        "rules engine readings/s with 100 rules, from Kafka",
        rules["readings_per_s"],
        rules["aim_readings_per_s"],
        rules["aim_met"],
    )
    return found


def writers(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The writer's runs this bench made: into InfluxDB 1.x, then 2.7 where it could run."""
    return [results[key] for key in WRITERS if key in results]


def influx_name(writer: dict[str, Any]) -> str:
    """The InfluxDB a writer's run wrote to: "InfluxDB 1.6.7" (without Debian's "~rc0")."""
    version: str = writer["influxdb"]
    return f"InfluxDB {version.split('~')[0]}"


async def forget_sessions(settings: Settings, client_ids: list[str]) -> None:
    """Remove the subject's sessions: the broker would queue readings for them."""
    for client_id in client_ids:
        client = Client(client_id, clean_session=True, session_expiry_interval=0)
        await client.connect(settings.mqtt.host, settings.mqtt.port)
        await client.disconnect()


def bench_table(results: dict[str, Any]) -> Table:
    rates = sorted({rate for run in results["runs"] for rate in run.get("latency", {})}, key=float)
    table = Table(
        "run", "drain /s", "live /s", *(f"p50/p99/max ms @{r}/s" for r in rates),
        "CPU s/10k", "RSS MB", "lost", title="iotgw bench",
    )  # fmt: skip

    def lat(run: dict[str, Any], rate: str) -> str:
        found = run.get("latency", {}).get(rate)
        if not found or found.get("p50_ms") is None:
            return "-"
        return f"{found['p50_ms']:g} / {found['p99_ms']:g} / {found['max_ms']:g}"

    for run in results["runs"]:
        behind = "" if run["drain"]["finished"] else " (behind)"
        table.add_row(
            run["name"],
            f"{run['readings_per_s']:,}{behind}",
            f"{run['live_readings_per_s']:,}" if run.get("live_readings_per_s") else "-",
            *(lat(run, rate) for rate in rates),
            f"{run['cpu_s_per_10k']:g}",
            f"{run['rss_mb']:g}",
            "-" if run.get("lost") is None else str(run["lost"]),
        )
    for ceiling in results["ceilings"]:
        table.add_row(
            f"[dim]{ceiling['name']} (ceiling)[/]", f"{ceiling['readings_per_s'] or 0:,}",
            "-", *("-" for _ in rates), "-", "-", "-",
        )  # fmt: skip
    lines = []
    for writer in writers(results):
        lines.append(
            f"writer: {writer['points_per_s']:,} points/s into {influx_name(writer)} "
            f"(its ceiling {writer['ceiling_points_per_s']:,}; "
            f"{writer['cpu_s_per_100k']:g} CPU s per 100k)"
        )
        if "client_points_per_s" in writer:
            lines.append(
                f"influxdb-client into {influx_name(writer)}: "
                f"{writer['client_points_per_s']:,} points/s given Point objects, "
                f"{writer['client_line_protocol_per_s']:,} given our line protocol"
            )
    rules = results["rules"]
    lines.append(
        f"rules engine, 100 rules, from Kafka: {rules['readings_per_s']:,} readings/s "
        f"({rules['cpu_s_per_100k']:g} CPU s per 100k)"
    )
    table.caption = "\n".join(lines)
    return table


def profile_table(results: dict[str, Any]) -> Table | None:
    """With --profile: each profiled run's share of samples and CPU µs per reading by stage."""
    profiled = [run for run in results["runs"] if "profile" in run]
    if not profiled:
        return None
    table = Table("run", "stage", "share", "CPU µs per reading", title="where the time goes")
    for run in profiled:
        per_reading_us = run["cpu_s_per_10k"] * 100  # CPU s per 10,000 readings, in µs each
        for stage, share in run["profile"].items():
            table.add_row(run["name"], stage, f"{share:.1%}", f"{share * per_reading_us:.1f}")
    return table


def aims_table(results: dict[str, Any]) -> Table:
    """Each aim of issue #16 against this run's figure."""
    table = Table("aim", "this run", "target", "met", title="aims")
    for aim in results["aims"]:
        figure = "-" if aim["figure"] is None else f"{aim['figure']:,.6g}"
        table.add_row(
            aim["aim"],
            figure,
            f"{aim['target']:,.6g}",
            "[green]yes[/]" if aim["met"] else "[red]no[/]",
        )
    return table


def chart(results: dict[str, Any], path: Path) -> None:
    """Drain rate of every subject beside the two ceilings, the latency at fixed rates,
    and the writer (into each InfluxDB, beside its ceiling) and rules engine against their
    aims, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, ceilings_found = results["runs"], results["ceilings"]
    figure, (left, middle, right) = plt.subplots(
        1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [3, 2, 3]}
    )
    names = [c["name"] for c in ceilings_found] + [r["name"] for r in runs]
    drains = [c["readings_per_s"] or 0 for c in ceilings_found] + [
        r["readings_per_s"] for r in runs
    ]
    colours = ["#bbbbbb"] * len(ceilings_found) + [
        "#dd8452" if r["name"] == "telegraf" else "#4c72b0" for r in runs
    ]
    bars = left.bar(names, drains, color=colours)
    left.bar_label(bars, labels=[f"{d / 1000:.1f}k" for d in drains], fontsize=8)
    left.set_title("drain readings/s (grey: ceilings)")
    left.tick_params(axis="x", labelrotation=20, labelsize=8)
    for rate_key in ("1000", "5000"):
        points = [(r["name"], r.get("latency", {}).get(rate_key, {})) for r in runs]
        shown = [(n, p) for n, p in points if p.get("p99_ms") is not None]
        middle.plot([n for n, _ in shown], [p["p99_ms"] for _, p in shown], marker="o",
                    label=f"p99 at {rate_key}/s")  # fmt: skip
        middle.plot([n for n, _ in shown], [p["p50_ms"] for _, p in shown], marker="x",
                    linestyle="--", label=f"p50 at {rate_key}/s")  # fmt: skip
    middle.axhline(25, color="#c44e52", linewidth=0.8, linestyle=":", label="aim: p99 < 25 ms")
    middle.set_yscale("log")
    middle.set_title("publish to Kafka latency (ms)")
    middle.legend(fontsize=7)
    labels: list[str] = []
    values: list[float] = []
    shades: list[str] = []
    aims_at: list[tuple[int, float]] = []
    for writer in writers(results):
        influx = influx_name(writer)
        aims_at.append((len(labels), writer["aim_points_per_s"]))
        labels += [f"writer\n{influx}", f"ceiling\n{influx}"]
        values += [writer["points_per_s"], writer["ceiling_points_per_s"]]
        shades += ["#4c72b0", "#bbbbbb"]
    rules = results["rules"]
    aims_at.append((len(labels), rules["aim_readings_per_s"]))
    labels.append("rules\nreadings/s")
    values.append(rules["readings_per_s"])
    shades.append("#55a868")
    bars = right.bar(labels, values, color=shades)
    right.bar_label(bars, labels=[f"{v / 1000:.1f}k" for v in values], fontsize=8)
    right.scatter([x for x, _ in aims_at], [y for _, y in aims_at],
                  marker="_", s=900, color="#c44e52", label="aim", zorder=3)  # fmt: skip
    right.tick_params(axis="x", labelsize=8)
    right.set_title("downstream (grey: InfluxDB's ceilings)")
    right.legend(fontsize=7)
    machine_info = results["machine"]
    figure.suptitle(f"iotgw bench, {machine_info['cpus']} cores, {machine_info['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
