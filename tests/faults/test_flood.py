"""A device floods the bridge: it gets `rate_limited` dead letters, every other device's
readings still arrive, once and in order; the bridge holds no more than its in-flight
limit; the others' latency is measured against an unloaded run."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from devstack.installer import ensure_debian_packages
from gateway.settings import Settings
from gateway.topics import Topics
from simulators.processes import ServiceProcess, rss_mb
from tests.faults.test_bridge_faults import bridge_process, stream, thermostats
from tests.support import (
    TopicReader,
    forget_session,
    own_settings,
    reading_payload,
    register,
    until,
)

pytestmark = pytest.mark.faults

# Five seconds' worth at the 20,000 readings/s a flooding device might send.
FLOOD_READINGS = 100_000


def latencies_ms(records: list[Any], devices: set[str]) -> list[float]:
    """Per reading of `devices`: from the device's publish (its `ts`) to the bridge's
    produce call (the Kafka record's timestamp)."""
    out = []
    for record in records:
        value = json.loads(record.value)
        if value["device_id"] in devices:
            out.append(record.timestamp - value["ts"])
    return out


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


async def flood(settings: Settings, device_id: str, count: int) -> None:
    """Publish `count` readings as one device, as fast as Mosquitto's own C client can
    (QoS 1, each acknowledged by the broker)."""
    process = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", settings.mqtt.host, "-p", str(settings.mqtt.port),
        "-V", "mqttv5", "-q", "1", "-t", f"devices/{device_id}/telemetry",
        "-m", reading_payload(seq=0).decode(), "--repeat", str(count), "--repeat-delay", "0",
    )  # fmt: skip
    assert await asyncio.wait_for(process.wait(), 120) == 0


async def test_flooding_device_is_rate_limited_and_others_keep_flowing(
    settings: Settings, tmp_path: Path
) -> None:
    """Ten devices send 30 readings/s each, first alone, then beside a device that floods
    100,000 readings as fast as mosquitto_pub sends them. The flooder gets rate_limited
    dead letters and no more accepted readings than its limit allows; every other reading
    arrives, once."""
    ensure_debian_packages(["mosquitto_sub"], tmp_path / "install.log", print)
    s = await own_settings(settings)
    others, [flooder] = thermostats(10), thermostats(1)
    await register(s, *others, flooder)
    ids = {d.device_id for d in others}
    names = Topics(s.topic_prefix)
    log = tmp_path / "bridge.log"
    try:
        async with (
            bridge_process(s, log) as bridge,
            TopicReader(s, names.readings) as readings,
            TopicReader(s, names.dead_letters) as dead_letters,
        ):
            await stream(s, others, 150, rate=30)
            await readings.wait_for(1500)
            unloaded = latencies_ms(readings.records, ids)

            mark, sent = len(readings.records), FLOOD_READINGS
            started = time.monotonic()
            flooding = asyncio.create_task(flood(s, flooder.device_id, sent))
            watched = asyncio.Event()
            watching = asyncio.create_task(watch(bridge, watched))
            await stream(s, others, 300, rate=30)  # while the flood goes on
            await flooding
            flood_s = time.monotonic() - started

            def of_flooder() -> int:
                return sum(
                    (r.key or b"").decode() == flooder.device_id
                    for r in readings.records + dead_letters.records
                )

            await until(lambda: of_flooder() >= sent, 180, f"{sent} flood readings")
            drained_s = time.monotonic() - started
            watched.set()
            in_flight, rss = await watching
            await until(lambda: len(readings.records) - mark >= 3000, 60, "others' readings")
            loaded = latencies_ms(readings.records[mark:], ids)
    finally:
        await forget_session(s)

    in_partition = sorted(readings.records, key=lambda r: (r.partition, r.offset))
    for device in ids:
        seqs = [json.loads(r.value)["seq"] for r in in_partition if r.key == device.encode()]
        # Every reading once, in the order the device sent it: the first stream, then the
        # second (whose seq starts at 0 again).
        assert seqs == [*range(150), *range(300)], device
    assert max(in_flight) <= s.max_in_flight, max(in_flight)
    accepted = sum((r.key or b"").decode() == flooder.device_id for r in readings.records)
    limited = [r for r in dead_letters.records if dict(r.headers)["error"] == b"rate_limited"]
    assert limited
    assert accepted + len(limited) == sent
    # The limit: a burst of 2,000, then 100 readings/s while the bridge works through them.
    assert accepted <= 2000 + 100 * drained_s + 100
    print(
        f"flood: {sent} readings in {flood_s:.1f} s ({sent / flood_s:.0f}/s), all judged "
        f"after {drained_s:.1f} s: "
        f"{accepted} accepted, {len(limited)} rate_limited; others' latency p50/p99 "
        f"unloaded {statistics.median(unloaded):.0f}/{p99(unloaded):.0f} ms, "
        f"during the flood {statistics.median(loaded):.0f}/{p99(loaded):.0f} ms "
        f"(p99 x{p99(loaded) / max(p99(unloaded), 1):.1f}); in flight at most "
        f"{max(in_flight):.0f} of {s.max_in_flight}; bridge peak RSS (session and workers) "
        f"{max(rss):.0f} MB"
    )


async def watch(bridge: ServiceProcess, done: asyncio.Event) -> tuple[list[float], list[float]]:
    """Sample the bridge's in-flight gauge and its memory until `done`."""
    in_flight: list[float] = []
    rss: list[float] = []
    while not done.is_set():
        in_flight.append((await asyncio.to_thread(bridge.metrics))["iotgw_bridge_in_flight"])
        rss.append(rss_mb(bridge.pid))
        await asyncio.sleep(0.05)
    return in_flight, rss
