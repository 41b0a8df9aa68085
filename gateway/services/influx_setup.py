"""`iotgw influx setup` and `iotgw influx rollup`: the database or bucket, its retention,
and the hourly rollups, made by InfluxDB itself (continuous queries on 1.x, a task on
2.x), created or updated idempotently from the device types (built-in and the types
file's); and the rollups of hours those missed, made from the raw readings.

Setup never deletes readings on its own: a retention shorter than the data already kept
is applied only when asked (`shorten`), and only after the readings it would delete are
rolled up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.adapters.influx import InfluxClient, InfluxError
from gateway.clock import now_ms
from gateway.domain.rollups import (
    DAY_S,
    HOUR_S,
    ROLLUP_RETENTION_POLICY,
    ContinuousQuery,
    continuous_queries,
    go_duration_s,
    influxql_duration,
    is_rollup_query,
    rollup_backfill,
    rollup_bucket,
    rollup_task,
    rollup_task_name,
    shard_duration_s,
    shown_duration,
)
from gateway.errors import IotgwError
from gateway.settings import Settings

__all__ = ["InfluxSetup", "rollup_history", "setup_influx"]

Report = Callable[[str], None]

_HOUR_MS = HOUR_S * 1000
# The rollups of past hours are made a week at a time: each query stays small.
_BACKFILL_STEP_MS = 7 * DAY_S * 1000


@dataclass
class InfluxSetup:
    """What `setup_influx` found and did, one line per object."""

    version: int
    lines: list[str] = field(default_factory=list)

    def say(self, report: Report, line: str) -> None:
        self.lines.append(line)
        report(line)


async def setup_influx(settings: Settings, report: Report, *, shorten: bool = False) -> InfluxSetup:
    """Create or update what iotgw needs in the InfluxDB `settings` name; with `shorten`,
    also a raw retention shorter than the readings kept (rolled up first)."""
    async with InfluxClient.for_settings(settings) as influx:
        if not await influx.ping():
            raise IotgwError(f"InfluxDB does not answer at {influx.url}")
        try:
            if influx.v2:
                return await _setup_v2(influx, settings, report, shorten)
            return await _setup_v1(influx, settings, report, shorten)
        except InfluxError as exc:
            raise IotgwError(f"InfluxDB setup failed: {exc}") from None


async def rollup_history(settings: Settings, report: Report, since_s: int) -> int:
    """Make the rollups of the last `since_s` seconds from the raw readings (after an
    outage longer than the two hours InfluxDB recomputes); the hours done."""
    async with InfluxClient.for_settings(settings) as influx:
        if not await influx.ping():
            raise IotgwError(f"InfluxDB does not answer at {influx.url}")
        try:
            raw_rp = None if influx.v2 else await _default_rp(influx, settings.influx_database)
            start = (now_ms() - since_s * 1000) // _HOUR_MS * _HOUR_MS
            return await _backfill(influx, settings, raw_rp, start, report)
        except InfluxError as exc:
            raise IotgwError(f"InfluxDB rollup failed: {exc}") from None


async def _setup_v1(
    influx: InfluxClient, settings: Settings, report: Report, shorten: bool
) -> InfluxSetup:
    done = InfluxSetup(1)
    db = settings.influx_database
    await influx.create_database(db)
    policies = {str(row[0]): row for row in await influx.rows(f'SHOW RETENTION POLICIES ON "{db}"')}
    raw_rp = next((name for name, row in policies.items() if row[4]), "autogen")
    rollup_s = settings.influx_rollup_retention
    current = policies.get(ROLLUP_RETENTION_POLICY)
    outcome = await _retention_policy(
        influx,
        db,
        ROLLUP_RETENTION_POLICY,
        rollup_s,
        go_duration_s(str(current[1])) if current else None,
    )
    done.say(
        report,
        f"hourly rollups ({db}.{ROLLUP_RETENTION_POLICY}): kept {shown_duration(rollup_s)} "
        f"({outcome})",
    )
    wanted = continuous_queries(settings.catalogue(), db, raw_rp, settings.influx_rollup_every)
    outcome = await _continuous_queries(influx, db, wanted)
    done.say(
        report,
        f"continuous queries: {len(wanted)} for {len(settings.catalogue().names)} device types, "
        f"recomputing the last 2 hours every {shown_duration(settings.influx_rollup_every)} "
        f"({outcome})",
    )
    raw_s = go_duration_s(str(policies[raw_rp][1])) if raw_rp in policies else 0

    async def apply(retention_s: int) -> str:
        return await _retention_policy(influx, db, raw_rp, retention_s, raw_s)

    line = await _raw_retention(influx, settings, raw_rp, raw_s, shorten, apply, report)
    done.say(report, f"raw readings ({db}.{raw_rp}): {line}")
    return done


async def _default_rp(influx: InfluxClient, db: str) -> str:
    policies = await influx.rows(f'SHOW RETENTION POLICIES ON "{db}"')
    return next((str(row[0]) for row in policies if row[4]), "autogen")


async def _continuous_queries(influx: InfluxClient, db: str, wanted: list[ContinuousQuery]) -> str:
    """Make the continuous queries `wanted` and no other of iotgw's: "unchanged", or how
    many were created, replaced and dropped."""
    existing = {
        str(row[0]): str(row[1])
        for result in await influx.query("SHOW CONTINUOUS QUERIES")
        for series in result.get("series", [])
        if series.get("name") == db
        for row in series.get("values", [])
        if is_rollup_query(str(row[0]))
    }
    created = replaced = 0
    for query in wanted:
        # InfluxDB prints a query back without the quotes it does not need.
        if existing.get(query.name, "").replace('"', "") == query.statement.replace('"', ""):
            continue
        # A continuous query cannot be changed, only replaced; the next run recomputes
        # the last two hours, so the moment without one loses nothing.
        if query.name in existing:
            await influx.query(f'DROP CONTINUOUS QUERY "{query.name}" ON "{db}"', method="POST")
            replaced += 1
        else:
            created += 1
        await influx.query(query.statement, method="POST")
    names = {query.name for query in wanted}
    obsolete = sorted(set(existing) - names)
    for name in obsolete:
        await influx.query(f'DROP CONTINUOUS QUERY "{name}" ON "{db}"', method="POST")
    if not (created or replaced or obsolete):
        return "unchanged"
    return f"{created} created, {replaced} replaced, {len(obsolete)} dropped"


async def _retention_policy(
    influx: InfluxClient, db: str, name: str, retention_s: int, current_s: int | None
) -> str:
    duration = influxql_duration(retention_s)
    shard = influxql_duration(shard_duration_s(retention_s))
    if current_s is None:
        await influx.query(
            f'CREATE RETENTION POLICY "{name}" ON "{db}" DURATION {duration} REPLICATION 1 '
            f"SHARD DURATION {shard}",
            method="POST",
        )
        return "created"
    if current_s == retention_s:
        return "unchanged"
    await influx.query(
        f'ALTER RETENTION POLICY "{name}" ON "{db}" DURATION {duration} SHARD DURATION {shard}',
        method="POST",
    )
    return f"was {shown_duration(current_s)}"


async def _setup_v2(
    influx: InfluxClient, settings: Settings, report: Report, shorten: bool
) -> InfluxSetup:
    done = InfluxSetup(2)
    bucket = settings.influx_database
    rollups = rollup_bucket(bucket)
    rollup_s = settings.influx_rollup_retention
    existing = await influx.bucket_retention_s(bucket)
    if existing is None:
        await influx.ensure_bucket(bucket, retention_s=settings.influx_retention)
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
    if existing is None:
        line = f"kept {shown_duration(settings.influx_retention)} (created)"
    else:

        async def apply(retention_s: int) -> str:
            return await influx.ensure_bucket(bucket, retention_s=retention_s)

        line = await _raw_retention(influx, settings, None, existing, shorten, apply, report)
    done.say(report, f"raw readings (bucket {bucket}): {line}")
    return done


async def _raw_retention(
    influx: InfluxClient,
    settings: Settings,
    raw_rp: str | None,
    current_s: int,
    shorten: bool,
    apply: Callable[[int], Awaitable[str]],
    report: Report,
) -> str:
    """Set the raw readings' retention unless that would delete readings nobody asked to
    delete; with `shorten`, roll those up first. The line to say about it."""
    wanted_s = settings.influx_retention
    shorter = bool(wanted_s) and (not current_s or current_s > wanted_s)
    oldest = await _oldest_ms(influx, settings.influx_database, raw_rp) if shorter else None
    cutoff = now_ms() - wanted_s * 1000
    if oldest is not None and oldest < cutoff:
        if not shorten:
            return (
                f"kept {shown_duration(current_s)}, not {shown_duration(wanted_s)}: it holds "
                f"readings older than {shown_duration(wanted_s)}, which that would delete; "
                "`iotgw influx setup --shorten` rolls them up, then sets it"
            )
        hours = await _backfill(influx, settings, raw_rp, oldest // _HOUR_MS * _HOUR_MS, report)
        outcome = await apply(wanted_s)
        return (
            f"kept {shown_duration(wanted_s)} ({outcome}; {hours:,} hours of the readings "
            "already kept rolled up first)"
        )
    outcome = await apply(wanted_s)
    return f"kept {shown_duration(wanted_s)} ({outcome})"


async def _oldest_ms(influx: InfluxClient, db: str, raw_rp: str | None) -> int | None:
    """The time of the oldest point of any measurement of the raw readings, or None."""
    source = f'"{raw_rp}"./.*/' if raw_rp else "/.*/"
    found = await influx.rows(f"SELECT * FROM {source} ORDER BY time ASC LIMIT 1", db=db)
    return min((int(row[0]) for row in found), default=None)


async def _backfill(
    influx: InfluxClient, settings: Settings, raw_rp: str | None, start_ms: int, report: Report
) -> int:
    """Roll the hours from `start_ms` (hour-aligned) to now up, a week at a time, with
    progress; the hours done."""
    db = settings.influx_database
    stop = (now_ms() // _HOUR_MS + 1) * _HOUR_MS
    steps = list(range(start_ms, stop, _BACKFILL_STEP_MS))
    catalogue = settings.catalogue()
    queries = (
        []
        if raw_rp is None
        else continuous_queries(catalogue, db, raw_rp, settings.influx_rollup_every)
    )
    report(f"rolling up {(stop - start_ms) // _HOUR_MS:,} hours of readings, a week at a time")
    for done, first in enumerate(steps, 1):
        last = min(first + _BACKFILL_STEP_MS, stop)
        if raw_rp is None:
            await influx.run_flux(rollup_backfill(catalogue, db, first, last))
        for query in queries:
            await influx.query(query.backfill(first, last), db=db, method="POST")
        if done % 10 == 0 or done == len(steps):
            report(f"rolled up week {done} of {len(steps)}")
    return (stop - start_ms) // _HOUR_MS
