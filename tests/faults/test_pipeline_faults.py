"""Faults of the servers under a simulated fleet: each scenario streams readings with
`seq` through Mosquitto, the bridge, Kafka and the writer into InfluxDB, breaks a server
mid-stream, and ends with the loss audit: nothing lost, nothing twice in InfluxDB."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from devstack import stack
from gateway.adapters.kafka import kafka_admin
from gateway.settings import Settings
from gateway.topics import Topics
from simulators.audit import (
    AuditReport,
    SendLog,
    audit_until_settled,
    entry_key,
    read_since,
    reading_key,
)
from simulators.formats import Format
from simulators.processes import ServiceProcess, free_ports, rss_mb
from simulators.runner import run_simulation
from tests.conftest import stack_settings
from tests.faults.tcp_proxy import TcpProxy
from tests.faults.test_bridge_faults import bridge_process, kill_9
from tests.support import (
    forget_session,
    mixed_home_settings,
    own_settings,
    running_bridge,
    running_writer,
    until,
)

pytestmark = pytest.mark.faults

# The bridge's count of readings Kafka acknowledged (its metrics, scraped).
PUBLISHED = "iotgw_bridge_readings_published_total"


class Simulation:
    """A simulated fleet streaming in the background, logged for the audit."""

    def __init__(self, settings: Settings, log: Path, *, devices: int, rate: float,
                 duration: float, seed: int) -> None:  # fmt: skip
        self.settings, self.log = settings, log
        simulation = run_simulation(
            settings, devices=devices, rate=rate, duration=duration, qos=1, faults={},
            register=True, log=log, seed=seed,
        )  # fmt: skip
        self.task = asyncio.create_task(simulation)

    async def audit(self, wait_s: float) -> AuditReport:
        """Wait for the fleet to finish, then audit until the pipeline has caught up."""
        await self.task
        report = await audit_until_settled(self.settings, SendLog.read(self.log), wait_s)
        assert report.lost == 0, f"lost {report.lost}, e.g. {report.lost_examples}"
        assert report.in_kafka == report.valid_sent == report.sent
        assert report.missing_in_influx == 0
        assert report.duplicates_in_influx == 0
        return report


@asynccontextmanager
async def own_stack(plan: stack.StackPlan, settings: Settings) -> AsyncIterator[Settings]:
    """A stack of the servers a test breaks, deleted after."""
    try:
        await stack.up(plan, settings)
        yield settings
    finally:
        stack.down(plan.root, purge=True)


async def test_influxdb_kill_9_mid_stream(settings: Settings, tmp_path: Path) -> None:
    """InfluxDB is killed (-9) while the fleet streams and comes back 10 s later: the
    writer pauses, retries, and every reading is one point."""
    plan = stack.StackPlan(
        tmp_path / "influx", influx_port=free_ports(1, step=2), kinds=("influxdb",)
    )
    async with own_stack(plan, settings):
        s = await own_settings(
            settings, influx_url=plan.influx_url, writer_flush_interval_s=0.2, timeout_s=3.0
        )
        try:
            async with running_bridge(s), running_writer(s) as writer:
                fleet = Simulation(s, tmp_path / "sent.jsonl", devices=20, rate=200,
                                   duration=25, seed=1)  # fmt: skip
                points = writer.metrics.points.labels("readings")
                await until(lambda: points._value.get() >= 1000, 30, "1,000 points")
                kill_9(plan, "influxdb")
                down_at = time.monotonic()
                await until(lambda: writer.metrics.paused._value.get() == 1, 30, "writer paused")
                await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
                await stack.up(plan, settings)
                report = await fleet.audit(120)
                assert writer.metrics.retries._value.get() > 0
        finally:
            await forget_session(s)
    print(
        f"InfluxDB kill -9: {report.sent} sent, lost {report.lost}, in InfluxDB {report.in_influx}"
    )


async def test_mosquitto_kill_9_mid_stream(settings: Settings, tmp_path: Path) -> None:
    """Mosquitto (persistence on) is killed (-9) mid-stream and started again: the devices
    and the bridge reconnect by themselves and the audit finds nothing lost."""
    plan = stack.StackPlan(tmp_path / "mqtt", mqtt_port=free_ports(1), kinds=("mosquitto",))
    mqtt = stack_settings(plan, kafka_bootstrap=settings.kafka_bootstrap)
    async with own_stack(plan, mqtt):
        s = await own_settings(mqtt, writer_flush_interval_s=0.2)
        try:
            async with running_bridge(s) as bridge, running_writer(s):
                fleet = Simulation(s, tmp_path / "sent.jsonl", devices=20, rate=200,
                                   duration=20, seed=2)  # fmt: skip
                sent = bridge.metrics.published
                await until(lambda: sent._value.get() >= 1000, 30, "1,000 readings in Kafka")
                kill_9(plan, "mosquitto")
                await until(lambda: not bridge.readiness()["mqtt"], 10, "bridge sees the loss")
                await stack.up(plan, mqtt)
                await until(lambda: bridge.readiness()["mqtt"], 30, "bridge reconnected")
                report = await fleet.audit(120)
        finally:
            await forget_session(s)
    print(f"Mosquitto kill -9: {report.sent} sent, lost {report.lost}, "
          f"duplicates in Kafka {report.duplicates}")  # fmt: skip


async def _leader(bootstrap: str, topic: str) -> int:
    async with kafka_admin(bootstrap, 10) as admin:
        described = await admin.describe_topics([topic])
    return int(described[0]["partitions"][0]["leader"])


async def test_three_broker_cluster_leader_kill_and_two_brokers_down(
    settings: Settings, tmp_path: Path
) -> None:
    """Three brokers, replication 3, min ISR 2. The leader of a partition of iot.readings is
    killed (-9) mid-stream: publishing pauses briefly and goes on. Later two of the three
    brokers stop: the bridge stops acknowledging (nothing reaches Kafka, the broker holds the
    backlog) and its memory stays bounded; when they return the backlog drains."""
    plan = stack.StackPlan(
        tmp_path / "cluster", kafka_port=free_ports(3), kafka_brokers=3, kinds=("kafka",)
    )
    cluster = stack_settings(
        plan, mqtt_url=settings.mqtt_url.get_secret_value(), influx_url=str(settings.influx_url)
    )
    figures: dict[str, Any] = {}
    async with own_stack(plan, cluster):
        s = await own_settings(cluster, max_in_flight=500, writer_flush_interval_s=0.2)
        log = tmp_path / "bridge.log"
        try:
            async with bridge_process(s, log) as bridge, running_writer(s):
                fleet = Simulation(s, tmp_path / "sent.jsonl", devices=20, rate=200,
                                   duration=60, seed=3)  # fmt: skip
                await _until_published(bridge, 1000)
                leader = await _leader(plan.kafka_bootstrap, Topics(s.topic_prefix).readings)
                kill_9(plan, f"kafka-{leader}")
                pause = await _longest_pause(bridge, more=1000)
                await stack.up(plan, cluster)

                survivor = next(n for n in (1, 2, 3) if n != leader)
                down = {f"kafka-{n}" for n in (1, 2, 3) if n != survivor}
                stack.down(plan.root, only=down)
                peak, acknowledged = await _outage(bridge, log, max_in_flight=500)
                up_at = time.time()
                await stack.up(plan, cluster)
                report = await fleet.audit(180)
                drained_at = time.time()
                peak = max(peak, rss_mb(bridge.pid))
        finally:
            await forget_session(s)
    figures = {
        "pause_after_leader_kill_s": pause,
        "acknowledged_while_two_down": acknowledged,
        "backlog_drained_s": drained_at - up_at,
        "bridge_peak_rss_mb": peak,
    }
    print(f"three brokers: {report.sent} sent, lost {report.lost}; {figures}")
    # With two of three brokers down no write reaches min.insync.replicas: back-pressure.
    assert figures["acknowledged_while_two_down"] == 0
    assert peak < 250


async def scrape(bridge: ServiceProcess) -> dict[str, float]:
    return await asyncio.to_thread(bridge.metrics)


async def _longest_pause(bridge: ServiceProcess, *, more: int) -> float:
    """The longest time the bridge acknowledged nothing to Kafka, watched until it has
    published `more` readings again."""
    first = last = (await scrape(bridge))[PUBLISHED]
    last_change, longest = time.monotonic(), 0.0
    async with asyncio.timeout(90):
        while last < first + more:
            await asyncio.sleep(0.1)
            now, value = time.monotonic(), (await scrape(bridge))[PUBLISHED]
            if value > last:
                longest, last_change, last = max(longest, now - last_change), now, value
    return longest


async def _until_published(bridge: ServiceProcess, count: int) -> None:
    """Wait until the bridge process has had `count` readings acknowledged by Kafka."""
    deadline = time.monotonic() + 60
    while True:
        found = (await scrape(bridge))[PUBLISHED]
        if found >= count:
            return
        assert time.monotonic() < deadline, f"{found} of {count} readings acknowledged"
        await asyncio.sleep(0.5)


async def _outage(
    bridge: ServiceProcess, log: Path, *, max_in_flight: int | None = None
) -> tuple[float, float]:
    """Watch the bridge process through a 20 s outage: its peak RSS (MB), and how many
    readings it had acknowledged by Kafka after the first 5 s (in-flight work settled)."""
    started, peak, acknowledged = time.monotonic(), 0.0, []
    while time.monotonic() < started + 20:
        peak = max(peak, rss_mb(bridge.pid))
        assert bridge.process.poll() is None, f"the bridge exited; see {log}"
        metrics = await scrape(bridge)
        if max_in_flight is not None:
            assert metrics["iotgw_bridge_in_flight"] <= max_in_flight
        if time.monotonic() > started + 5:
            acknowledged.append(metrics[PUBLISHED])
        await asyncio.sleep(0.5)
    return peak, acknowledged[-1] - acknowledged[0]


async def test_slow_then_broken_network_between_bridge_and_kafka(
    settings: Settings, tmp_path: Path
) -> None:
    """A proxy between the services and Kafka adds 200 ms to every packet for 10 s, then
    cuts every connection and refuses new ones for 20 s: the bridge goes on slower, then
    stops acknowledging with bounded memory; once the network is back nothing is lost."""
    port = free_ports(2)
    plan = stack.StackPlan(
        tmp_path / "kafka", kafka_port=port, kafka_advertised_port=port + 1, kinds=("kafka",)
    )
    direct = stack_settings(
        plan, mqtt_url=settings.mqtt_url.get_secret_value(), influx_url=str(settings.influx_url)
    )
    async with TcpProxy(port + 1, port) as proxy, own_stack(plan, direct):
        s = await own_settings(
            direct, kafka_bootstrap=f"127.0.0.1:{port + 1}", writer_flush_interval_s=0.2
        )
        log = tmp_path / "bridge.log"
        try:
            async with bridge_process(s, log) as bridge, running_writer(s):
                fleet = Simulation(s, tmp_path / "sent.jsonl", devices=20, rate=200,
                                   duration=45, seed=4)  # fmt: skip
                await _until_published(bridge, 1000)
                proxy.latency_s = 0.2
                before = (await scrape(bridge))[PUBLISHED]
                await asyncio.sleep(10)
                slow_rate = ((await scrape(bridge))[PUBLISHED] - before) / 10
                proxy.cut()
                peak, acknowledged = await _outage(bridge, log)
                proxy.latency_s = 0.0
                proxy.restore()
                restored_at = time.monotonic()
                report = await fleet.audit(180)
                drained_s = time.monotonic() - restored_at
                peak = max(peak, rss_mb(bridge.pid))
        finally:
            await forget_session(s)
    print(
        f"network: {report.sent} sent, lost {report.lost}; with 200 ms latency "
        f"{slow_rate:.0f} readings/s acknowledged; during the cut "
        f"{acknowledged:.0f}; drained {drained_s:.1f} s after; "
        f"bridge peak RSS {peak:.0f} MB"
    )
    assert acknowledged == 0
    assert peak < 250


async def test_mixed_fleet_keeps_each_devices_order_through_a_bridge_kill_9(
    settings: Settings, tmp_path: Path
) -> None:
    """A home of Zigbee2MQTT, Tasmota, Shelly and envelope devices streams through a bridge
    (its own process, reading the sources file) killed -9 mid-stream and started again:
    the audit loses nothing, nothing is twice in InfluxDB, and in iot.readings each
    device's readings come in the order it sent them (a redelivered message may repeat
    what followed it, never overtake it)."""
    s, base_topic = await mixed_home_settings(settings, tmp_path)
    log, bridge_log = tmp_path / "sent.jsonl", tmp_path / "bridge.log"
    try:
        async with running_writer(s):
            async with bridge_process(s, bridge_log) as first:
                simulation = asyncio.create_task(run_simulation(
                    s, devices=30, rate=200, duration=20, qos=1, faults={}, register=True,
                    log=log, seed=23, fleet_format="mixed", base_topic=base_topic,
                ))  # fmt: skip
                await until(lambda: first.metrics().get(PUBLISHED, 0) > 1000, 30, "a stream")
                first.kill()
            async with bridge_process(s, bridge_log):
                await simulation
                sent = SendLog.read(log)
                report = await audit_until_settled(s, sent, 90)
                records = await read_since(s, Topics(s.topic_prefix).readings, sent.window_ms[0])
    finally:
        await forget_session(s)
    assert report.lost == 0, f"lost {report.lost}, e.g. {report.lost_examples}"
    assert report.in_kafka == report.valid_sent == report.sent > 2000
    assert report.missing_in_influx == report.duplicates_in_influx == 0
    sent_at = {key: n for n, e in enumerate(sent.entries) if (key := entry_key(e)) is not None}
    formats = {e["device_id"]: e["format"] for e in sent.entries}
    assert set(formats.values()) == {f.value for f in Format}
    order: dict[str, list[int]] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        key = reading_key(record.value)
        if key is not None and key in sent_at:
            order.setdefault(key[0], []).append(sent_at[key])
    for device, positions in order.items():
        first_seen = list(dict.fromkeys(positions))  # a redelivered reading, first time only
        assert first_seen == sorted(first_seen), f"{device} ({formats[device]}) out of order"
    print(f"mixed fleet, bridge kill -9: {report.sent} sent, lost {report.lost}, "
          f"{report.duplicates} duplicates in Kafka, none twice in InfluxDB")  # fmt: skip
