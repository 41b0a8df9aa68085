"""The writer under faults: InfluxDB gone for 30 s, the writer killed mid-batch."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from devstack import stack
from gateway.adapters.kafka import produce
from gateway.clock import now_ms
from gateway.settings import Settings
from gateway.topics import Topics
from simulators.processes import ServiceProcess, free_ports
from tests.conftest import unique
from tests.support import (
    canonical,
    influx_count,
    own_settings,
    running_writer,
    until_points,
)

pytestmark = pytest.mark.faults


def readings(device: str, first: int, count: int, t0: int) -> list[tuple[bytes | None, bytes]]:
    return [
        (device.encode(), canonical(device, "thermostat", i, t0 + i, temperature_c=20.5))
        for i in range(first, first + count)
    ]


@pytest.mark.parametrize("version", [1, 2], ids=["influxdb1.6", "influxdb2.7"])
async def test_influxdb_outage_of_30_s_loses_no_point(
    settings: Settings, tmp_path: Path, version: int
) -> None:
    """InfluxDB stops for 30 s while readings keep coming: the writer pauses and retries,
    and once InfluxDB is back every point is there."""
    plan = stack.StackPlan(
        tmp_path / "influx",
        influx_port=free_ports(1, step=2),
        kinds=("influxdb",),
        influx_version=version,
    )
    await stack.up(plan, settings)
    s = await own_settings(
        stack.influx_settings(plan, settings), writer_flush_interval_s=0.2, timeout_s=3.0
    )
    device, t0 = unique("thermo"), now_ms() - 3_600_000
    topic = Topics(s.topic_prefix).readings
    try:
        async with running_writer(s) as writer:
            await produce(s, topic, readings(device, 0, 1000, t0))
            await until_points(s, "thermostat", 1000)
            stack.down(plan.root)
            for second in range(30):
                await produce(s, topic, readings(device, 1000 + second * 100, 100, t0))
                await asyncio.sleep(1)
            assert writer.metrics.retries._value.get() > 0
            assert writer.metrics.paused._value.get() == 1
            await stack.up(plan, settings)
            await until_points(s, "thermostat", 4000, timeout_s=90)
        assert await influx_count(s, "thermostat") == 4000
    finally:
        stack.down(plan.root, purge=True)


async def test_kill_9_mid_batch_then_restart_writes_every_point_once(
    settings: Settings, tmp_path: Path
) -> None:
    """kill -9 the writer while it writes 20,000 readings; after a restart every point is
    there, and there is exactly one per reading."""
    s = await own_settings(settings, writer_batch_size=1000)
    device, t0 = unique("thermo"), now_ms() - 3_600_000
    await produce(s, Topics(s.topic_prefix).readings, readings(device, 0, 20_000, t0))
    log = tmp_path / "writer.log"

    first = ServiceProcess("writer", s, log).start()
    try:
        deadline = time.monotonic() + 60
        while await influx_count(s, "thermostat") < 3000:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            await asyncio.sleep(0.05)
        first.process.send_signal(signal.SIGKILL)
    finally:
        first.kill()
    written_before_restart = await influx_count(s, "thermostat")
    second = ServiceProcess("writer", s, log).start()
    try:
        await until_points(s, "thermostat", 20_000, timeout_s=120)
    finally:
        second.stop()
    print(f"kill -9 after {written_before_restart} points; after restart: 20,000 points")
    assert await influx_count(s, "thermostat") == 20_000
