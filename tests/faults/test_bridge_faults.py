"""The bridge under faults: killed, stopped, and Kafka gone for 30 s. Nothing is lost."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from devstack import stack
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from simulators.processes import ServiceProcess, free_ports, process_tree, rss_mb
from tests.conftest import stack_settings, unique
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    reading_payload,
    register,
    until,
)

pytestmark = pytest.mark.faults


@asynccontextmanager
async def bridge_process(
    settings: Settings, log: Path, *options: str, ready: bool = True
) -> AsyncIterator[ServiceProcess]:
    """`iotgw run bridge [OPTIONS]` as its own process, ready (its /readyz answers) unless
    `ready` is false; killed at the end if still running."""
    bridge = ServiceProcess("bridge", settings, log, *options).start()
    try:
        if ready:
            await bridge.ready()
        yield bridge
    finally:
        bridge.kill()


def pid_of(plan: stack.StackPlan, name: str) -> int:
    pids = {server.name: server.pid for server in stack.status(plan.root)}
    pid = pids[name]
    assert pid is not None, f"{name} is not running"
    return pid


def kill_9(plan: stack.StackPlan, name: str) -> None:
    os.kill(pid_of(plan, name), signal.SIGKILL)


def thermostats(count: int) -> list[Device]:
    return [
        Device(device_id=unique("fault"), type=DeviceType.THERMOSTAT, registered_at=0)
        for _ in range(count)
    ]


async def stream(
    settings: Settings, devices: list[Device], per_device: int, rate: float, first_seq: int = 0
) -> None:
    """Each device publishes `per_device` readings (seq `first_seq`..) at about `rate` per
    second."""

    async def one(device: Device) -> None:
        async with DevicePublisher(settings.mqtt.host, settings.mqtt.port) as publisher:
            started = time.monotonic()
            for n in range(per_device):
                await publisher.publish(
                    f"devices/{device.device_id}/telemetry", reading_payload(seq=first_seq + n)
                )
                ahead = n / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)

    await asyncio.gather(*(one(device) for device in devices))


async def all_in_kafka(
    readings: TopicReader, expected: set[tuple[str, int]], timeout_s: float
) -> None:
    """Wait until every (device, seq) expected has been read from the topic."""

    def arrived() -> bool:
        return {(v["device_id"], v["seq"]) for v in readings.values()} >= expected

    await until(arrived, timeout_s, f"{len(expected)} readings in Kafka")


def report(readings: TopicReader, expected: set[tuple[str, int]], label: str) -> None:
    """Assert nothing is missing; print the duplicates (at-least-once allows them)."""
    seen = Counter((v["device_id"], v["seq"]) for v in readings.values())
    missing = expected - set(seen)
    duplicates = sum(n - 1 for n in seen.values())
    print(f"{label}: {len(expected)} sent, {len(seen)} distinct in Kafka, {duplicates} duplicates")
    assert not missing, f"{len(missing)} readings lost, e.g. {sorted(missing)[:5]}"


async def test_kill_9_mid_stream_loses_nothing(settings: Settings, tmp_path: Path) -> None:
    """kill -9 the bridge in a 20,000-reading stream, start it again: every reading is in
    iot.readings (duplicates counted and reported)."""
    s = await own_settings(settings)
    devices = thermostats(10)
    await register(s, *devices)
    expected = {(d.device_id, seq) for d in devices for seq in range(2000)}
    log = tmp_path / "bridge.log"
    try:
        async with TopicReader(s, Topics(s.topic_prefix).readings) as readings:
            async with bridge_process(s, log) as first:
                publishing = asyncio.create_task(stream(s, devices, 2000, rate=400))
                await readings.wait_for(5000, 60)
                first.process.send_signal(signal.SIGKILL)
                first.process.wait()
            async with bridge_process(s, log):
                await publishing
                await all_in_kafka(readings, expected, 90)
        report(readings, expected, "kill -9")
    finally:
        await forget_session(s)


async def test_sigterm_under_load_exits_within_10_s(settings: Settings, tmp_path: Path) -> None:
    """SIGTERM while readings stream in: the bridge exits 0 within 10 s, and what it did not
    acknowledge is delivered after a restart."""
    s = await own_settings(settings)
    devices = thermostats(5)
    await register(s, *devices)
    expected = {(d.device_id, seq) for d in devices for seq in range(1500)}
    log = tmp_path / "bridge.log"
    try:
        async with TopicReader(s, Topics(s.topic_prefix).readings) as readings:
            async with bridge_process(s, log) as first:
                publishing = asyncio.create_task(stream(s, devices, 1500, rate=500))
                await readings.wait_for(1000, 60)
                asked = time.monotonic()
                first.process.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(first.process.wait, 15)
                took = time.monotonic() - asked
            assert code == 0, log.read_text()[-2000:]
            assert took < 10, f"took {took:.1f} s"
            assert "event=bridge_stopped" in log.read_text()
            async with bridge_process(s, log):
                await publishing
                await all_in_kafka(readings, expected, 60)
        report(readings, expected, "SIGTERM")
    finally:
        await forget_session(s)


async def test_sigterm_while_kafka_is_unreachable_at_start_exits_within_10_s(
    settings: Settings, tmp_path: Path
) -> None:
    """Kafka does not answer (nothing listens there): the bridge is still starting, trying
    for IOTGW_TIMEOUT_S (here 30 s), when SIGTERM comes; it exits 0 within 10 s."""
    s = settings.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{free_ports(1)}", "timeout_s": 30.0}
    )
    log = tmp_path / "bridge.log"
    async with bridge_process(s, log, ready=False) as bridge:
        # Its worker runs: start-up is under way, waiting for Kafka.
        await until(lambda: len(process_tree(bridge.pid)) > 1, 10, "the worker started")
        asked = time.monotonic()
        bridge.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(bridge.process.wait, 15)
        took = time.monotonic() - asked
    assert code == 0, log.read_text()[-2000:]
    assert took < 10, f"took {took:.1f} s"
    assert "event=bridge_stopped" in log.read_text()


async def test_kafka_outage_of_30_s_loses_nothing_and_memory_stays_bounded(
    settings: Settings, tmp_path: Path
) -> None:
    """Kafka stops for 30 s mid-stream: the bridge stops acknowledging (the broker keeps
    the backlog), its memory stays under 250 MB, and after Kafka returns all arrives."""
    plan = stack.StackPlan(tmp_path / "kafka", kafka_port=free_ports(1), kinds=("kafka",))
    kafka = stack_settings(plan, mqtt_url=settings.mqtt_url.get_secret_value())
    await stack.up(plan, kafka)
    s = await own_settings(kafka, max_in_flight=200)
    devices = thermostats(10)
    await register(s, *devices)
    per_device = 450  # 45 s at 10 readings/s per device: 5 s before, 30 s out, 10 s after
    expected = {(d.device_id, seq) for d in devices for seq in range(per_device)}
    log = tmp_path / "bridge.log"
    peak = 0.0
    try:
        async with bridge_process(s, log) as bridge:
            publishing = asyncio.create_task(stream(s, devices, per_device, rate=10))
            await asyncio.sleep(5)
            stack.down(plan.root)
            outage_end = time.monotonic() + 30
            while time.monotonic() < outage_end:
                peak = max(peak, rss_mb(bridge.pid))
                assert bridge.process.poll() is None, log.read_text()[-2000:]
                await asyncio.sleep(0.5)
            await stack.up(plan, kafka)
            async with TopicReader(s, Topics(s.topic_prefix).readings) as readings:
                await publishing
                deadline = time.monotonic() + 90
                while not {(v["device_id"], v["seq"]) for v in readings.values()} >= expected:
                    assert time.monotonic() < deadline, "backlog did not drain within 90 s"
                    peak = max(peak, rss_mb(bridge.pid))
                    await asyncio.sleep(0.5)
            report(readings, expected, "Kafka outage")
    finally:
        await forget_session(s)
        stack.down(plan.root, purge=True)
    print(f"bridge peak RSS during the outage and drain: {peak:.0f} MB")
    assert peak < 250


async def test_two_workers_keep_each_devices_order_through_a_backlog_drain(
    settings: Settings, tmp_path: Path
) -> None:
    """`iotgw run bridge --workers 2` is stopped; 7 devices (an odd number, so that no
    device maps to a worker by chance) publish 1,000 readings each; the bridge starts
    again while each device sends 1,000 more: in its partition, every device's 2,000
    readings are there, in the order it sent them."""
    s = await own_settings(settings)
    devices = thermostats(7)
    await register(s, *devices)
    log = tmp_path / "bridge.log"
    try:
        async with bridge_process(s, log, "--workers", "2") as first:
            first.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.process.wait, 15) == 0
        await stream(s, devices, 1000, rate=100_000)
        async with (
            TopicReader(s, Topics(s.topic_prefix).readings) as readings,
            bridge_process(s, log, "--workers", "2"),
        ):
            started = time.monotonic()
            await stream(s, devices, 1000, rate=200, first_seq=1000)
            await readings.wait_for(14_000, 120)
            took = time.monotonic() - started
    finally:
        await forget_session(s)
    assert "workers=2" in log.read_text()
    in_partition = sorted(readings.records, key=lambda r: (r.partition, r.offset))
    for device in devices:
        key = device.device_id.encode()
        seqs = [json.loads(r.value)["seq"] for r in in_partition if r.key == key]
        assert seqs == list(range(2000)), device.device_id
    print(f"backlog drain, 2 workers: 7,000 queued + 7,000 live in order, {took:.1f} s")


async def test_readings_sent_after_a_broker_crash_reach_a_bridge_that_was_away(
    settings: Settings, tmp_path: Path
) -> None:
    """Mosquitto (persistence on) is killed -9 and started again while the bridge is frozen
    (SIGSTOP), so it cannot reconnect; 500 readings published right after the restart are
    all delivered once it resumes: the broker restored the bridge's plain persistent
    subscription from its snapshot and queued them."""
    plan = stack.StackPlan(tmp_path / "mqtt", mqtt_port=free_ports(1), kinds=("mosquitto",))
    mqtt = stack_settings(plan, kafka_bootstrap=settings.kafka_bootstrap)
    snapshot = plan.root / "mosquitto" / "data" / "mosquitto.db"
    await stack.up(plan, mqtt)
    try:
        s = await own_settings(mqtt)
        devices = thermostats(5)
        await register(s, *devices)
        expected = {(d.device_id, seq) for d in devices for seq in range(200)}
        log = tmp_path / "bridge.log"
        async with (
            TopicReader(s, Topics(s.topic_prefix).readings) as readings,
            bridge_process(s, log) as bridge,
        ):
            subscribed_at = time.time()
            await stream(s, devices, 100, rate=100)
            await readings.wait_for(500)
            await until(
                lambda: snapshot.exists() and snapshot.stat().st_mtime > subscribed_at,
                10,
                "a snapshot taken after the bridge subscribed",
            )
            bridge.process.send_signal(signal.SIGSTOP)
            try:
                kill_9(plan, "mosquitto")
                await stack.up(plan, mqtt)
                await stream(s, devices, 100, rate=100_000, first_seq=100)
            finally:
                bridge.process.send_signal(signal.SIGCONT)
            await all_in_kafka(readings, expected, 60)
        await forget_session(s)
    finally:
        stack.down(plan.root, purge=True)
    report(readings, expected, "broker kill -9 with the bridge away")


async def test_a_killed_worker_stops_the_bridge_and_a_restart_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """kill -9 one of two workers mid-stream: the bridge stops at once with one line naming
    it and exit code 1 (its supervisor restarts it); started again, nothing is lost."""
    s = await own_settings(settings)
    devices = thermostats(6)
    await register(s, *devices)
    expected = {(d.device_id, seq) for d in devices for seq in range(1000)}
    log = tmp_path / "bridge.log"
    try:
        async with TopicReader(s, Topics(s.topic_prefix).readings) as readings:
            async with bridge_process(s, log, "--workers", "2") as first:
                publishing = asyncio.create_task(stream(s, devices, 1000, rate=300))
                await readings.wait_for(1000, 60)
                worker = process_tree(first.pid)[-1]
                os.kill(worker, signal.SIGKILL)
                code = await asyncio.to_thread(first.process.wait, 15)
            assert code == 1
            assert re.search(r"bridge worker \d exited: killed by signal 9", log.read_text())
            async with bridge_process(s, log, "--workers", "2"):
                await publishing
                await all_in_kafka(readings, expected, 60)
        report(readings, expected, "worker kill -9")
    finally:
        await forget_session(s)
