"""`iotgw influx setup`: the database or bucket, its retention, and the hourly rollups,
made by InfluxDB itself (continuous queries on 1.x, a task on 2.x), created or updated
idempotently from the device types (built-in and the types file's)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.adapters.influx import InfluxClient, InfluxError
from gateway.domain.rollups import (
    HOUR_S,
    ROLLUP_RETENTION_POLICY,
    continuous_queries,
    influxql_duration,
    is_rollup_query,
    rollup_bucket,
    rollup_task,
    rollup_task_name,
    shard_duration_s,
    shown_duration,
)
from gateway.errors import IotgwError
from gateway.settings import Settings

__all__ = ["InfluxSetup", "go_duration_s", "setup_influx"]

Report = Callable[[str], None]

_GO_DURATION = re.compile(r"(\d+)(h|m|s)")


@dataclass
class InfluxSetup:
    """What `setup_influx` found and did, one line per object."""

    version: int
    lines: list[str] = field(default_factory=list)

    def say(self, report: Report, line: str) -> None:
        self.lines.append(line)
        report(line)


def go_duration_s(text: str) -> int:
    """InfluxDB 1.x's durations as SHOW RETENTION POLICIES prints them (`720h0m0s`)."""
    return sum(
        int(n) * {"h": HOUR_S, "m": 60, "s": 1}[unit] for n, unit in _GO_DURATION.findall(text)
    )


async def setup_influx(settings: Settings, report: Report) -> InfluxSetup:
    """Create or update what iotgw needs in the InfluxDB `settings` name."""
    async with InfluxClient.for_settings(settings) as influx:
        if not await influx.ping():
            raise IotgwError(f"InfluxDB does not answer at {influx.url}")
        try:
            if influx.v2:
                return await _setup_v2(influx, settings, report)
            return await _setup_v1(influx, settings, report)
        except InfluxError as exc:
            raise IotgwError(f"InfluxDB setup failed: {exc}") from None


async def _setup_v1(influx: InfluxClient, settings: Settings, report: Report) -> InfluxSetup:
    done = InfluxSetup(1)
    db = settings.influx_database
    await influx.create_database(db)
    policies = {str(row[0]): row for row in await influx.rows(f'SHOW RETENTION POLICIES ON "{db}"')}
    raw_rp = next((name for name, row in policies.items() if row[4]), "autogen")
    raw_s, rollup_s = settings.influx_retention, settings.influx_rollup_retention
    raw_outcome = await _retention_policy(influx, db, raw_rp, raw_s, policies.get(raw_rp))
    done.say(report, f"raw readings ({db}.{raw_rp}): kept {shown_duration(raw_s)} ({raw_outcome})")
    rollup_outcome = await _retention_policy(
        influx, db, ROLLUP_RETENTION_POLICY, rollup_s, policies.get(ROLLUP_RETENTION_POLICY)
    )
    done.say(
        report,
        f"hourly rollups ({db}.{ROLLUP_RETENTION_POLICY}): kept {shown_duration(rollup_s)} "
        f"({rollup_outcome})",
    )
    wanted = continuous_queries(settings.catalogue(), db, raw_rp, settings.influx_rollup_every)
    existing = {
        str(row[0])
        for result in await influx.query("SHOW CONTINUOUS QUERIES")
        for series in result.get("series", [])
        if series.get("name") == db
        for row in series.get("values", [])
    }
    # A continuous query cannot be changed, only replaced; the next run recomputes the
    # last two hours, so the moment without one loses nothing.
    for name in sorted(n for n in existing if is_rollup_query(n)):
        await influx.query(f'DROP CONTINUOUS QUERY "{name}" ON "{db}"', method="POST")
    for query in wanted:
        await influx.query(query.statement, method="POST")
    done.say(
        report,
        f"continuous queries: {len(wanted)} for {len(settings.catalogue().names)} device types, "
        f"recomputing the last 2 hours every {shown_duration(settings.influx_rollup_every)}",
    )
    return done


async def _retention_policy(
    influx: InfluxClient, db: str, name: str, retention_s: int, row: list[object] | None
) -> str:
    duration = influxql_duration(retention_s)
    shard = influxql_duration(shard_duration_s(retention_s))
    if row is None:
        await influx.query(
            f'CREATE RETENTION POLICY "{name}" ON "{db}" DURATION {duration} REPLICATION 1 '
            f"SHARD DURATION {shard}",
            method="POST",
        )
        return "created"
    if go_duration_s(str(row[1])) == retention_s:
        return "unchanged"
    await influx.query(
        f'ALTER RETENTION POLICY "{name}" ON "{db}" DURATION {duration} SHARD DURATION {shard}',
        method="POST",
    )
    return f"was {shown_duration(go_duration_s(str(row[1])))}"


async def _setup_v2(influx: InfluxClient, settings: Settings, report: Report) -> InfluxSetup:
    done = InfluxSetup(2)
    bucket = settings.influx_database
    rollups = rollup_bucket(bucket)
    raw_s, rollup_s = settings.influx_retention, settings.influx_rollup_retention
    outcome = await influx.ensure_bucket(bucket, retention_s=raw_s)
    done.say(report, f"raw readings (bucket {bucket}): kept {shown_duration(raw_s)} ({outcome})")
    outcome = await influx.ensure_bucket(rollups, retention_s=rollup_s)
    done.say(
        report, f"hourly rollups (bucket {rollups}): kept {shown_duration(rollup_s)} ({outcome})"
    )
    # InfluxQL (Grafana, `iotgw` itself) reads both under the bucket's name as database.
    await influx.ensure_dbrp(bucket, bucket, "autogen", default=True)
    await influx.ensure_dbrp(bucket, rollups, ROLLUP_RETENTION_POLICY, default=False)
    done.say(
        report,
        f"InfluxQL: database {bucket} = bucket {bucket}, "
        f"{bucket}.{ROLLUP_RETENTION_POLICY} = bucket {rollups}",
    )
    name = rollup_task_name(bucket)
    flux = rollup_task(settings.catalogue(), bucket, settings.influx_rollup_every)
    outcome = await influx.ensure_task(name, flux)
    done.say(
        report,
        f"task {name}: rollups of {len(settings.catalogue().names)} device types, recomputing "
        f"the last 2 hours every {shown_duration(settings.influx_rollup_every)} ({outcome})",
    )
    return done
