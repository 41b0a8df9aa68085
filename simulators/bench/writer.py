"""Benchmark: points per second the writer puts into InfluxDB with its default settings.

    python -m simulators.bench.writer --readings 200000

Against the local stack. Produces N canonical readings (100 devices of every type) to
topics of its own, runs `iotgw run writer` as a separate process with the defaults, and
times from its start until InfluxDB holds every point. Prints one JSON object and
deletes its topics and database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import create_producer, ensure_topics, kafka_admin
from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from simulators.processes import ServiceProcess, usage

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


async def fill(settings: Settings, count: int) -> None:
    await ensure_topics(settings)
    producer = create_producer(settings, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    t0 = now_ms() - 3_600_000
    types = list(METRICS)
    try:
        futures = []
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
            futures.append(
                await producer.send(
                    Topics(settings.topic_prefix).readings,
                    json.dumps(value).encode(),
                    key=device_id.encode(),
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def points(settings: Settings) -> int:
    async with InfluxClient(str(settings.influx_url)) as influx:
        try:
            found = await influx.rows(
                'SELECT count("seq") FROM /^(thermostat|motion|smart_plug)$/', db=settings.influx_db
            )
        except IotgwError:  # the writer has not created the database yet
            return 0
    return sum(int(row[1]) for row in found)


async def bench(count: int) -> dict[str, Any]:
    suffix = uuid.uuid4().hex[:8]
    settings = load_settings().model_copy(
        update={
            "topic_prefix": f"wbench{suffix}",
            "influx_db": f"wbench_{suffix}",
            "writer_group": f"wbench-{suffix}",
        }
    )
    await fill(settings, count)
    log = Path(tempfile.mkdtemp(prefix="iotgw-wbench-")) / "writer.log"
    started = time.perf_counter()
    writer = ServiceProcess("writer", settings, log).start()
    try:
        while (done := await points(settings)) < count:
            if writer.process.poll() is not None:
                raise RuntimeError(f"the writer exited; see {log}")
            await asyncio.sleep(0.25)
        seconds = time.perf_counter() - started
        cpu = usage(writer.pid)[0]
    finally:
        writer.stop()
        async with InfluxClient(str(settings.influx_url)) as influx:
            await influx.query(f'DROP DATABASE "{settings.influx_db}"', method="POST")
        async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
            await admin.delete_topics([s.name for s in Topics(settings.topic_prefix).specs()])
    return {
        "points": done,
        "seconds": round(seconds, 2),
        "points_per_s": round(done / seconds),
        "writer_cpu_s_per_100k": round(cpu / done * 100_000, 2),
        "batch_size": settings.writer_batch_size,
        "note": "includes the writer's start-up; InfluxDB and Kafka share the 2 cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    print(json.dumps(asyncio.run(bench(parser.parse_args().readings)), indent=2))


if __name__ == "__main__":
    main()
