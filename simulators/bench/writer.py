"""Benchmark: points per second the writer puts into InfluxDB 1.x or 2.x with its default
settings, beside that InfluxDB's own ceiling measured in the same run.

    python -m simulators.bench.writer --readings 200000                # InfluxDB 1.6.7
    python -m simulators.bench.writer --readings 200000 --influxdb 2   # InfluxDB 2.7

Against the local stack: `--influxdb 1` (the default) is the InfluxDB the settings name,
the stack's 1.6.7; `--influxdb 2` is the InfluxDB 2.7 the tests run beside it (port 8096,
built once and started if it does not run; stopped after if this run started it).
Produces N canonical readings (100 devices of every type) to topics of its own, runs
`iotgw run writer` as a separate process with the defaults, and times from its first
write until it has written every point (InfluxDB answered 2xx for all; then checked by
counting them in InfluxDB). The ceiling: the same points as line protocol encoded
beforehand, posted with plain HTTP (`/write` on 1.x, `/api/v2/write` on 2.x) in batches of
the writer's size over as many connections as the writer uses, before and after the
writer's run (the mean is the ceiling). On 2.x also influxdb-client's two ways of
writing the same readings, `Point` objects against the line protocol the writer makes.
Prints one JSON object and deletes its topics, databases and buckets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision
from pydantic_core import from_json

from devstack import stack
from devstack.installer import ensure_influxd2
from gateway.adapters.influx import InfluxClient, influx_reason
from gateway.adapters.kafka import ensure_topics, kafka_admin, produce
from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.services.writer import WRITES_IN_FLIGHT, PointEncoder
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from simulators.processes import ServiceProcess, usage

__all__ = ["INFLUXDB2", "influxdb2", "measure"]

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
# The InfluxDB 2.7 the tests run beside the stack's 1.6.7: the benchmark shares its build
# and, when it runs, its server.
INFLUXDB2 = stack.INFLUXDB2_BESIDE
# How often the writer's progress is read while it runs: fine enough for a run of a few
# seconds, rare enough to cost it nothing that shows.
_POLL_S = 0.05
_TIMEOUT_S = 300.0
# influxdb-client's two ways are each timed twice, alternately, so neither has the
# server's warm-up to itself.
_CLIENT_ROUNDS = 2
# influxdb-client's precisions are its strings ("ms"), typed as their class.
_MS = cast(WritePrecision, WritePrecision.MS)

Records = list[tuple[bytes, bytes]]


def readings(count: int) -> Records:
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
    """The points of the benchmark's measurements in `db` (2.x: the bucket, through its
    DBRP mapping)."""
    async with InfluxClient.for_settings(settings) as influx:
        try:
            found = await influx.rows(
                'SELECT count("seq") FROM /^(thermostat|motion|smart_plug)$/', db=db
            )
        except IotgwError:  # the writer has not created the database yet
            return 0
    return sum(int(row[1]) for row in found)


def line_protocol(settings: Settings, records: Records) -> list[str]:
    """The points the writer makes of the readings (no device is registered: no site, room)."""
    topic = Topics(settings.topic_prefix).readings
    encode = PointEncoder(Topics(settings.topic_prefix), lambda _: None).for_topic(topic)
    return [encode(SimpleNamespace(topic=topic, value=value)) for _, value in records]


def reading_point(value: bytes) -> Point:
    """A reading as influxdb-client's `Point`: the same point the writer makes of it."""
    reading = from_json(value)
    point: Point = Point.from_dict(
        {
            "measurement": reading["type"],
            "tags": {"device_id": reading["device_id"]},
            "fields": {**reading["metrics"], "seq": int(reading["seq"])},
            "time": reading["ts"],
        },
        write_precision=_MS,
    )
    return point


def influx_http(settings: Settings) -> httpx.AsyncClient:
    """Plain HTTP to the InfluxDB of `settings`, with its credentials (2.x: the token)."""
    token = settings.influx_token
    headers = {"Authorization": f"Token {token.get_secret_value()}"} if token else None
    return httpx.AsyncClient(
        base_url=str(settings.influx_url),
        auth=settings.influx_auth,
        headers=headers,
        timeout=settings.timeout_s,
    )


async def server_version(settings: Settings) -> str:
    """The version InfluxDB says it is (its `/ping` answers with it on 1.x and 2.x)."""
    async with influx_http(settings) as http:
        response = await http.get("/ping")
    return str(response.headers.get("X-Influxdb-Version", "unknown"))


@asynccontextmanager
async def scratch_database(settings: Settings, name: str) -> AsyncIterator[str]:
    """Database (2.x: bucket) `name`, created for the block and dropped after it."""
    async with InfluxClient.for_settings(settings) as influx:
        await influx.create_database(name)
    try:
        yield name
    finally:
        async with InfluxClient.for_settings(settings) as influx:
            await influx.drop_database(name)


async def ceiling(settings: Settings, lines: list[str], batch: int, connections: int) -> float:
    """InfluxDB's own points/s: `lines` posted with plain HTTP in batches of `batch` over
    `connections` keep-alive connections, into a database (2.x: bucket) of their own."""
    bodies = iter(["\n".join(lines[i : i + batch]).encode() for i in range(0, len(lines), batch)])
    async with scratch_database(settings, f"{settings.influx_database}_ceiling") as db:
        if settings.influx_v2:
            path = "/api/v2/write"
            params = {"org": settings.influx_org or "", "bucket": db, "precision": "ms"}
        else:
            path, params = "/write", {"db": db, "precision": "ms"}
        async with influx_http(settings) as http:

            async def post_all() -> None:
                for body in bodies:
                    response = await http.post(path, params=params, content=body)
                    if response.status_code != 204:
                        raise IotgwError(f"InfluxDB refused a write: {influx_reason(response)}")

            started = time.perf_counter()
            await asyncio.gather(*(post_all() for _ in range(connections)))
            seconds = time.perf_counter() - started
    return len(lines) / seconds


async def client_ways(
    settings: Settings, records: Records, batch: int, connections: int
) -> dict[str, float]:
    """influxdb-client's WriteApiAsync given the same readings two ways: as `Point` objects
    (it makes the line protocol), and as the bytes of the writer's own line protocol.

    Each way is timed from the Kafka records' values to InfluxDB's answer, in batches of
    `batch` with `connections` writes at once (as the writer does), into a bucket of its
    own; its points/s and this process's CPU seconds per 100,000 points.
    """
    topic = Topics(settings.topic_prefix).readings

    def as_points(chunk: Records) -> list[Point]:
        return [reading_point(value) for _, value in chunk]

    def as_line_protocol() -> Callable[[Records], bytes]:
        # An encoder of its own for each run, which starts with no series cached.
        encode = PointEncoder(Topics(settings.topic_prefix), lambda _: None).for_topic(topic)

        def encoded(chunk: Records) -> bytes:
            lines = [encode(SimpleNamespace(topic=topic, value=value)) for _, value in chunk]
            return "\n".join(lines).encode()

        return encoded

    ways: dict[str, Callable[[], Callable[[Records], list[Point] | bytes]]] = {
        "points": lambda: as_points,
        "line_protocol": as_line_protocol,
    }
    chunks = [records[i : i + batch] for i in range(0, len(records), batch)]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    assert settings.influx_token is not None
    org = settings.influx_org or ""
    async with (
        scratch_database(settings, f"{settings.influx_database}_client") as bucket,
        InfluxDBClientAsync(
            str(settings.influx_url),
            token=settings.influx_token.get_secret_value(),
            org=org,
            timeout=int(settings.timeout_s * 1000),
        ) as client,
    ):
        write_api = client.write_api()

        async def write_all(
            pending: Iterator[Records], encode: Callable[[Records], list[Point] | bytes]
        ) -> None:
            for chunk in pending:
                await write_api.write(bucket, org, encode(chunk), write_precision=_MS)

        for _ in range(_CLIENT_ROUNDS):
            for name, way in ways.items():
                encode, pending = way(), iter(chunks)
                cpu, started = time.process_time(), time.perf_counter()
                await asyncio.gather(*(write_all(pending, encode) for _ in range(connections)))
                runs[name].append((time.perf_counter() - started, time.process_time() - cpu))
    found: dict[str, float] = {}
    for name, timings in runs.items():
        seconds = sum(s for s, _ in timings)
        cpu = sum(c for _, c in timings)
        found[f"client_{name}_per_s"] = round(len(records) * len(timings) / seconds)
        found[f"client_{name}_cpu_s_per_100k"] = round(
            cpu / (len(records) * len(timings)) * 100_000, 2
        )
    return found


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
    """The writer's points/s with its defaults into the InfluxDB of `settings` (1.x or
    2.x), that InfluxDB's ceiling in the same call, and on 2.x influxdb-client's two ways."""
    suffix = uuid.uuid4().hex[:8]
    db = f"wbench_{suffix}"
    update: dict[str, Any] = {
        "topic_prefix": f"wbench{suffix}",
        "influx_db": db,
        "writer_group": f"wbench-{suffix}",
    }
    if settings.influx_v2:
        update["influx_bucket"] = db
    settings = settings.model_copy(update=update)
    version = await server_version(settings)
    batch, connections = settings.writer_batch_size, WRITES_IN_FLIGHT
    records = readings(count)
    lines = line_protocol(settings, records)
    client: dict[str, float] = {}
    try:
        report(f"writer: {count:,} readings into Kafka, for InfluxDB {version}")
        await ensure_topics(settings)
        await produce(settings, Topics(settings.topic_prefix).readings, records, **BULK)
        # As `iotgw influx setup` makes it: the writer on 2.x writes to a bucket that exists.
        async with InfluxClient.for_settings(settings) as influx:
            await influx.create_database(db)
        report(f"writer: InfluxDB's ceiling, batches of {batch} over {connections} connections")
        ceilings = [await ceiling(settings, lines, batch, connections)]
        report(f"writer: iotgw run writer into InfluxDB {version}")
        log = logs / f"writer-influxdb{version.split('.')[0]}.log"
        result = await run_writer(settings, count, log, report)
        stored = await points(settings, db)
        if stored != count:
            raise IotgwError(f"InfluxDB holds {stored} of the {count} points")
        report("writer: InfluxDB's ceiling again")
        ceilings.append(await ceiling(settings, lines, batch, connections))
        if settings.influx_v2:
            report("writer: influxdb-client's Point objects against our line protocol")
            client = await client_ways(settings, records, batch, connections)
    finally:
        async with InfluxClient.for_settings(settings) as influx:
            await influx.drop_database(db)
        async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
            await admin.delete_topics([s.name for s in Topics(settings.topic_prefix).specs()])
    top = sum(ceilings) / len(ceilings)
    aim = min(100_000.0, 0.8 * top)
    return {
        "influxdb": version,
        **result,
        "batch_size": batch,
        "connections": connections,
        "ceiling_points_per_s": round(top),
        "ceiling_runs": [round(c) for c in ceilings],
        "share_of_ceiling": round(result["points_per_s"] / top, 2),
        "aim_points_per_s": round(aim),
        "aim_met": result["points_per_s"] >= aim,
        **client,
        "note": "InfluxDB, Kafka and the writer share the machine's cores",
    }


@asynccontextmanager
async def influxdb2(
    settings: Settings, log: Path, report: Callable[[str], None]
) -> AsyncIterator[Settings | None]:
    """`settings` pointed at the local InfluxDB 2.7 (`INFLUXDB2`), started if it does not
    run and then stopped after the block; None, said in one line, where it cannot be built
    (no Go or Rust, or a failed build), like Telegraf."""
    try:
        ensure_influxd2(log, report)
    except IotgwError as exc:
        report(f"influxdb 2: {exc} (the run goes on without InfluxDB 2)")
        yield None
        return
    started = await stack.up(INFLUXDB2, settings, report=report)
    try:
        yield stack.influx_settings(INFLUXDB2, settings)
    finally:
        if started.started:
            stack.down(INFLUXDB2.root, only=set(started.started), report=report)


async def run(
    version: int, count: int, logs: Path, report: Callable[[str], None]
) -> dict[str, Any]:
    """`measure` against InfluxDB `version`: 1, the one the settings name; 2, `INFLUXDB2`."""
    settings = load_settings()
    if version == 1:
        return await measure(settings, count, logs, report)
    async with influxdb2(settings, logs / "install.log", report) as settings2:
        if settings2 is None:
            raise IotgwError("InfluxDB 2.7 cannot be built here")
        return await measure(settings2, count, logs, report)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument(
        "--influxdb",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: the InfluxDB the settings name (the local stack's 1.6.7); "
        "2: the local InfluxDB 2.7 on port 8096, started if it does not run",
    )
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="iotgw-wbench-"))

    def report(message: str) -> None:
        print(message, file=sys.stderr)

    found = asyncio.run(run(args.influxdb, args.readings, logs, report))
    print(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()
