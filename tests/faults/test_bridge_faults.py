"""The bridge under faults: killed, stopped, and Kafka gone for 30 s. Nothing is lost."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway import stack
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from tests.conftest import stack_settings, unique
from tests.integration.test_stack import free_ports
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    reading_payload,
    register,
    start_service,
    until,
)

pytestmark = pytest.mark.faults


@contextmanager
def bridge_process(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`iotgw run bridge` as its own process; killed at the end if still running."""
    process = start_service("bridge", settings, log)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def until_started(log: Path, starts: int = 1) -> None:
    await until(
        lambda: log.read_text().count("event=bridge_started") >= starts, 30, "bridge started"
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def thermostats(count: int) -> list[Device]:
    return [
        Device(device_id=unique("fault"), type=DeviceType.THERMOSTAT, registered_at=0)
        for _ in range(count)
    ]


async def stream(settings: Settings, devices: list[Device], per_device: int, rate: float) -> None:
    """Each device publishes `per_device` readings (seq 0..) at about `rate` per second."""

    async def one(device: Device) -> None:
        async with DevicePublisher(settings.mqtt.host, settings.mqtt.port) as publisher:
            started = time.monotonic()
            for seq in range(per_device):
                await publisher.publish(
                    f"devices/{device.device_id}/telemetry", reading_payload(seq=seq)
                )
                ahead = seq / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)

    await asyncio.gather(*(one(device) for device in devices))


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
            with bridge_process(s, log) as first:
                await until_started(log)
                publishing = asyncio.create_task(stream(s, devices, 2000, rate=400))
                await readings.wait_for(5000, 60)
                first.send_signal(signal.SIGKILL)
                first.wait()
            with bridge_process(s, log):
                await until_started(log, starts=2)
                await publishing
                await until(
                    lambda: {(v["device_id"], v["seq"]) for v in readings.values()} >= expected,
                    90,
                    "all readings in Kafka",
                )
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
            with bridge_process(s, log) as first:
                await until_started(log)
                publishing = asyncio.create_task(stream(s, devices, 1500, rate=500))
                await readings.wait_for(1000, 60)
                asked = time.monotonic()
                first.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(first.wait, 15)
                took = time.monotonic() - asked
            assert code == 0, log.read_text()[-2000:]
            assert took < 10, f"took {took:.1f} s"
            assert "event=bridge_stopped" in log.read_text()
            with bridge_process(s, log):
                await until_started(log, starts=2)
                await publishing
                await until(
                    lambda: {(v["device_id"], v["seq"]) for v in readings.values()} >= expected,
                    60,
                    "all readings in Kafka",
                )
        report(readings, expected, "SIGTERM")
    finally:
        await forget_session(s)


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
        with bridge_process(s, log) as bridge:
            await until_started(log)
            publishing = asyncio.create_task(stream(s, devices, per_device, rate=10))
            await asyncio.sleep(5)
            stack.down(plan.root)
            outage_end = time.monotonic() + 30
            while time.monotonic() < outage_end:
                peak = max(peak, rss_mb(bridge.pid))
                assert bridge.poll() is None, log.read_text()[-2000:]
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
