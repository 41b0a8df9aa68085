"""`iotgw tail`: new validated readings, optionally of one device, as they arrive."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from gateway.adapters.kafka import produce
from gateway.clock import now_ms
from gateway.services.tail import format_reading
from gateway.settings import Settings
from gateway.topics import Topics
from tests.conftest import unique
from tests.support import canonical, own_settings

pytestmark = pytest.mark.integration


async def test_tail_follows_new_readings_of_one_device(settings: Settings) -> None:
    """Readings produced after tail started are shown; other devices' are not."""
    s = await own_settings(settings)
    mine, other = unique("plug"), unique("plug")
    topic = Topics(s.topic_prefix).readings
    await produce(s, topic, [(mine.encode(), canonical(mine, "smart_plug", 99, now_ms(), on=True))])
    env = {
        **os.environ,
        "IOTGW_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "IOTGW_TOPIC_PREFIX": s.topic_prefix,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "tail", "--device", mine, "--count", "3", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        ready = await asyncio.wait_for(process.stderr.readline(), 30)
        assert ready.decode().startswith(f"following {topic} for {mine}")
        t0 = now_ms()
        records = []
        for seq in range(3):
            records.append(
                (other.encode(), canonical(other, "smart_plug", seq, t0 + seq, on=False))
            )
            records.append((mine.encode(), canonical(mine, "smart_plug", seq, t0 + seq, on=True)))
        await produce(s, topic, records)
        stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    shown = [json.loads(line) for line in stdout.decode().splitlines()]
    assert [(r["device_id"], r["seq"]) for r in shown] == [(mine, 0), (mine, 1), (mine, 2)]
    assert process.returncode == 0


def test_readings_are_one_line_for_people() -> None:
    """Time, device, type, seq and the metrics on one line."""
    line = format_reading(
        {"device_id": "t1", "type": "thermostat", "ts": 1795676400123, "seq": 4,
         "metrics": {"temperature_c": 21.5, "heating": True}, "received_at": 1795676400130}
    )  # fmt: skip
    assert line == "07:00:00.123 t1 thermostat #4 temperature_c=21.5 heating=true"
