"""Benchmark: points per second the writer puts into InfluxDB with its default settings,
beside InfluxDB's own ceiling measured in the same run.

    python -m simulators.bench.writer --readings 200000

Against the local stack. Produces N canonical readings (100 devices of every type) to
topics of its own, runs `iotgw run writer` as a separate process with the defaults, and
times from its first write until it has written every point (InfluxDB answered 2xx for
all; then checked by counting them in InfluxDB). The ceiling: the same points as line
protocol encoded beforehand, posted in batches of the writer's size over as many
connections as the writer uses, before and after the writer's run (the mean is the
ceiling). Prints one JSON object and deletes its topics and databases.
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
from types import SimpleNamespace
from typing import Any

from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import ensure_topics, kafka_admin, produce
from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.services.writer import WRITES_IN_FLIGHT, PointEncoder
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from simulators.processes import ServiceProcess, usage

__all__ = ["measure"]

METRICS: dict[str, dict[str, Any]] = {
    "thermostat": {
        "temperature_c": 21.5,
        "humidity_pct": 40.0,
        "setpoint_c": 21.0,
        "heating": True,
    },
    "motion": {"motion": True, "lux": 300.0, "battery_pct": 90.0},
    "smart_plug": {"on": True, "power_w": 1200.0, "voltage_v": 230.0, "current_a": 5.2},
}
# Producer options for filling Kafka fast (the rules benchmark's too).
BULK: dict[str, Any] = {"linger_ms": 20, "max_batch_size": 512 * 1024}
# How often the writer's progress is read while it runs: fine enough for a run of a few
# seconds, rare enough to cost it nothing that shows.
_POLL_S = 0.05
_TIMEOUT_S = 300.0


def readings(count: int) -> list[tuple[bytes, bytes]]:
    """`count` canonical readings (key, value) of 100 devices of each type, an hour old."""
    t0 = now_ms() - 3_600_000
    types = list(METRICS)
    out = []
    for i in range(count):
        device_type = types[i % len(types)]
        device_id = f"wb-{device_type}-{i % 100}"
        value = {
            "device_id": device_id,
            "type": device_type,
            "ts": t0 + i,
            "seq": i,
            "metrics": METRICS[device_type],
            "received_at": t0 + i,
        }
        out.append((device_id.encode(), json.dumps(value).encode()))
    return out


async def points(settings: Settings, db: str) -> int:
    """The points of the benchmark's measurements in `db`."""
    async with InfluxClient(str(settings.influx_url)) as influx:
        try:
            found = await influx.rows(
                'SELECT count("seq") FROM /^(thermostat|motion|smart_plug)$/', db=db
            )
        except IotgwError:  # the writer has not created the database yet
            return 0
    return sum(int(row[1]) for row in found)


def line_protocol(settings: Settings, records: list[tuple[bytes, bytes]]) -> list[str]:
    """The points the writer makes of the readings (no device is registered: no site, room)."""
    topic = Topics(settings.topic_prefix).readings
    encode = PointEncoder(Topics(settings.topic_prefix), lambda _: None).for_topic(topic)
    return [encode(SimpleNamespace(topic=topic, value=value)) for _, value in records]


async def ceiling(settings: Settings, lines: list[str], batch: int, connections: int) -> float:
    """InfluxDB's own points/s: `lines` posted in batches of `batch` over `connections`
    keep-alive connections, into a database of their own (dropped after)."""
    db = f"{settings.influx_db}_ceiling"
    bodies = iter(["\n".join(lines[i : i + batch]) for i in range(0, len(lines), batch)])
    async with InfluxClient(str(settings.influx_url), auth=settings.influx_auth) as influx:
        await influx.create_database(db)

        async def post_all() -> None:
            for body in bodies:
                await influx.write(db, body)

        try:
            started = time.perf_counter()
            await asyncio.gather(*(post_all() for _ in range(connections)))
            seconds = time.perf_counter() - started
        finally:
            await influx.query(f'DROP DATABASE "{db}"', method="POST")
    return len(lines) / seconds


async def run_writer(
    settings: Settings, count: int, log: Path, report: Callable[[str], None]
) -> dict[str, Any]:
    """Run the writer until it has written `count` points: its rate from its first write
    (so the group join is not counted), its CPU over the same span, its peak memory."""
    started = time.perf_counter()
    writer = ServiceProcess("writer", settings, log).start()
    try:
        await writer.ready()
        ready = (time.perf_counter(), 0.0, usage(writer.pid)[0])
        written, first = 0.0, None
        deadline = time.monotonic() + _TIMEOUT_S
        while written < count:
            if time.monotonic() > deadline:
                raise IotgwError(f"the writer wrote {written:.0f} of {count} points; see {log}")
            await asyncio.sleep(_POLL_S)
            written = writer.metrics().get("iotgw_writer_points_written_total", 0.0)
            if first is None and written > 0:
                first = (time.perf_counter(), written, usage(writer.pid)[0])
                report(f"writer: first write after {first[0] - started:.1f} s")
        ended, (cpu, rss) = time.perf_counter(), usage(writer.pid)
    finally:
        writer.stop()
    assert first is not None
    # Every point seen at the first look (a tiny run): counted from the writer's readiness.
    at, before, cpu_before = first if first[1] < written else ready
    return {
        "points": int(written),
        "seconds": round(ended - at, 2),
        "points_per_s": round((written - before) / (ended - at)),
        "cpu_s_per_100k": round((cpu - cpu_before) / (written - before) * 100_000, 2),
        "rss_mb": round(rss, 1),
        "startup_s": round(at - started, 2),
    }


async def measure(
    settings: Settings, count: int, logs: Path, report: Callable[[str], None]
) -> dict[str, Any]:
    """The writer's points/s with its defaults, and InfluxDB's ceiling in the same call."""
    suffix = uuid.uuid4().hex[:8]
    settings = settings.model_copy(
        update={
            "topic_prefix": f"wbench{suffix}",
            "influx_db": f"wbench_{suffix}",
            "writer_group": f"wbench-{suffix}",
        }
    )
    batch, connections = settings.writer_batch_size, WRITES_IN_FLIGHT
    records = readings(count)
    lines = line_protocol(settings, records)
    try:
        report(f"writer: {count:,} readings into Kafka")
        await ensure_topics(settings)
        await produce(settings, Topics(settings.topic_prefix).readings, records, **BULK)
        report(f"writer: InfluxDB's ceiling, batches of {batch} over {connections} connections")
        ceilings = [await ceiling(settings, lines, batch, connections)]
        report("writer: iotgw run writer")
        result = await run_writer(settings, count, logs / "writer.log", report)
        stored = await points(settings, settings.influx_db)
        if stored != count:
            raise IotgwError(f"InfluxDB holds {stored} of the {count} points")
        report("writer: InfluxDB's ceiling again")
        ceilings.append(await ceiling(settings, lines, batch, connections))
    finally:
        async with InfluxClient(str(settings.influx_url), auth=settings.influx_auth) as influx:
            await influx.query(f'DROP DATABASE "{settings.influx_db}"', method="POST")
        async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
            await admin.delete_topics([s.name for s in Topics(settings.topic_prefix).specs()])
    top = sum(ceilings) / len(ceilings)
    aim = min(100_000.0, 0.8 * top)
    return {
        **result,
        "batch_size": batch,
        "connections": connections,
        "ceiling_points_per_s": round(top),
        "ceiling_runs": [round(c) for c in ceilings],
        "share_of_ceiling": round(result["points_per_s"] / top, 2),
        "aim_points_per_s": round(aim),
        "aim_met": result["points_per_s"] >= aim,
        "note": "InfluxDB, Kafka and the writer share the machine's cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    count = parser.parse_args().readings
    logs = Path(tempfile.mkdtemp(prefix="iotgw-wbench-"))

    def report(message: str) -> None:
        print(message, file=sys.stderr)

    print(json.dumps(asyncio.run(measure(load_settings(), count, logs, report)), indent=2))


if __name__ == "__main__":
    main()
