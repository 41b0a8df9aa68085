"""Retention and hourly rollups, as InfluxDB itself runs them (pure logic: the statements).

Raw readings are kept `IOTGW_INFLUX_RETENTION`; every hour of every device's metrics is
summed up into the rollup retention policy (1.x) or bucket (2.x), kept
`IOTGW_INFLUX_ROLLUP_RETENTION`. A rollup point has the reading's measurement (its type)
and tags, the hour's start as its time, and per metric:

- a number (float or int): `<metric>_mean`, `<metric>_min`, `<metric>_max`, `<metric>_count`;
- a boolean: `<metric>_count` (readings) and `<metric>_true` (readings that were true;
  absent in an hour without one), so `sum(<metric>_true) / sum(<metric>_count)` is the
  share of readings that were true.

InfluxDB recomputes the last two hours every `IOTGW_INFLUX_ROLLUP_EVERY` (10 minutes): the
current hour fills in as it goes, and readings that arrive up to an hour late are counted.
On 1.x continuous queries do it (RESAMPLE EVERY ... FOR 2h), on 2.x a task.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from schemas.rules import DURATION_UNITS_S, duration_seconds
from schemas.types import TypeCatalogue, TypeSpec

__all__ = [
    "RAW_RETENTION_S",
    "ROLLUP_EVERY_S",
    "ROLLUP_RETENTION_POLICY",
    "ROLLUP_RETENTION_S",
    "ROLLUP_WINDOW_S",
    "Retention",
    "RollupEvery",
    "continuous_queries",
    "duration_s",
    "go_duration_s",
    "influxql_duration",
    "rollup_backfill",
    "rollup_bucket",
    "rollup_task",
    "rollup_task_name",
    "shard_duration_s",
    "shown_duration",
]

HOUR_S = 3600
DAY_S = 24 * HOUR_S
RAW_RETENTION_S = 30 * DAY_S
ROLLUP_RETENTION_S = 2 * 365 * DAY_S
ROLLUP_EVERY_S = 600
# How far back each run recomputes: the hour before the current one, and the current one.
ROLLUP_WINDOW_S = 2 * HOUR_S
# 1.x: the retention policy the rollups go to (on 2.x, the DBRP mapping of that name).
ROLLUP_RETENTION_POLICY = "rollup"
# Continuous queries and tasks iotgw made carry this prefix (and only theirs are replaced).
_PREFIX = "iotgw_rollup"

# The units a retention or rollup interval may be written in, largest first.
_UNITS = ("y", "w", "d", "h", "m", "s")
_FOREVER = {"inf", "infinite", "forever"}


def _seconds(value: Any, what: str, examples: str) -> int:
    """A duration with a unit, or a whole number of seconds (as `Settings.environment`
    passes it on)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} is a number and a unit: {examples}")
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    seconds = duration_seconds(text, _UNITS)
    if seconds is None:
        raise ValueError(f"{what} is a number and a unit: {examples}")
    return int(seconds)


def _retention(value: Any) -> int:
    """`30d`, `8w`, `2y` (365 days), `inf` (kept forever: 0), or seconds."""
    if isinstance(value, str) and value.strip().lower() in _FOREVER:
        return 0
    seconds = _seconds(value, "a retention", "12h, 30d, 8w, 2y, or inf")
    if seconds and seconds < HOUR_S:
        raise ValueError("a retention is at least 1h (InfluxDB's shortest), or inf")
    return seconds


def duration_s(text: str) -> int:
    """A span like `36h`, `7d` or `8w` in seconds; ValueError saying what is wrong."""
    seconds = _seconds(text, "a duration", "36h, 7d, 8w")
    if seconds <= 0:
        raise ValueError("a duration is more than nothing: 36h, 7d, 8w")
    return seconds


def _every(value: Any) -> int:
    seconds = _seconds(value, "a rollup interval", "30s, 10m, 1h")
    if not 1 <= seconds <= HOUR_S:
        raise ValueError("the rollups are recomputed every 1s to 1h")
    return seconds


Retention = Annotated[int, BeforeValidator(_retention), Field(ge=0)]
RollupEvery = Annotated[int, BeforeValidator(_every)]


def shown_duration(seconds: int) -> str:
    """A duration as people write it: `30d`, `2y`, `90m`; `forever` for 0."""
    if not seconds:
        return "forever"
    return _in_largest_unit(seconds, _UNITS)


def go_duration_s(text: str) -> int:
    """InfluxDB 1.x's durations as SHOW RETENTION POLICIES prints them (`720h0m0s`)."""
    return sum(
        int(n) * int(DURATION_UNITS_S[unit]) for n, unit in re.findall(r"(\d+)(h|m|s)", text)
    )


def influxql_duration(seconds: int) -> str:
    """A duration in InfluxQL (which has no years): `720h`, `INF` for 0."""
    if not seconds:
        return "INF"
    return _in_largest_unit(seconds, _UNITS[1:])


def _in_largest_unit(seconds: int, units: tuple[str, ...]) -> str:
    """`seconds` as a whole number of the largest of `units` (largest first) that fits."""
    for unit in units:
        size = int(DURATION_UNITS_S[unit])
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def shard_duration_s(retention_s: int) -> int:
    """InfluxDB's own default shard group duration for a retention (0: forever), which
    must be shorter than the retention: under 2 days 1 hour, up to 6 months 1 day, else
    7 days."""
    if not retention_s or retention_s > 182 * DAY_S:
        return 7 * DAY_S
    return HOUR_S if retention_s < 2 * DAY_S else DAY_S


def _ident(name: str) -> str:
    """An InfluxQL identifier, quoted."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class ContinuousQuery:
    """A continuous query; its SELECT ... INTO, run over an explicit range, is its
    backfill."""

    name: str
    statement: str
    select: str
    where: str
    group_by: str

    def backfill(self, start_ms: int, stop_ms: int) -> str:
        """The same rollup of the hours from `start_ms` to `stop_ms` (hour-aligned)."""
        span = f"time >= {start_ms}ms AND time < {stop_ms}ms"
        where = f" WHERE {self.where} AND {span}" if self.where else f" WHERE {span}"
        return f"{self.select}{where} {self.group_by}"


def _numbers(spec: TypeSpec) -> list[str]:
    return [m.name for m in spec.metrics if m.kind != "bool"]


def continuous_queries(
    catalogue: TypeCatalogue, database: str, raw_rp: str, every_s: int
) -> list[ContinuousQuery]:
    """1.x: per device type one continuous query of its numbers' mean, min, max and count
    and its booleans' count, and per boolean one of the readings that were true."""
    queries = []
    resample = (
        f"RESAMPLE EVERY {influxql_duration(every_s)} FOR {influxql_duration(ROLLUP_WINDOW_S)}"
    )
    for name in catalogue.names:
        spec = catalogue.get(name)
        assert spec is not None
        into = f"{_ident(database)}.{_ident(ROLLUP_RETENTION_POLICY)}.{_ident(name)}"
        source = f"{_ident(database)}.{_ident(raw_rp)}.{_ident(name)}"
        selections = []
        for metric in _numbers(spec):
            for fn in ("mean", "min", "max", "count"):
                selections.append(f"{fn}({_ident(metric)}) AS {_ident(f'{metric}_{fn}')}")
        for metric in sorted(spec.booleans):
            selections.append(f"count({_ident(metric)}) AS {_ident(f'{metric}_count')}")
        queries.append(
            _cq(database, f"{_PREFIX}_{name}", resample, selections, into, source, where="")
        )
        for metric in sorted(spec.booleans):
            selection = f"count({_ident(metric)}) AS {_ident(f'{metric}_true')}"
            where = f"{_ident(metric)} = true"
            queries.append(
                _cq(
                    database,
                    f"{_PREFIX}_{name}_{metric}_true",
                    resample,
                    [selection],
                    into,
                    source,
                    where,
                )
            )
    return queries


def _cq(
    database: str,
    name: str,
    resample: str,
    selections: list[str],
    into: str,
    source: str,
    where: str,
) -> ContinuousQuery:
    select = f"SELECT {', '.join(selections)} INTO {into} FROM {source}"
    group_by = "GROUP BY time(1h), *"
    condition = f" WHERE {where}" if where else ""
    statement = (
        f"CREATE CONTINUOUS QUERY {_ident(name)} ON {_ident(database)} {resample} "
        f"BEGIN {select}{condition} {group_by} END"
    )
    return ContinuousQuery(name, statement, select, where, group_by)


def is_rollup_query(name: str) -> bool:
    """True for the continuous queries iotgw made (and may replace)."""
    return name.startswith(_PREFIX + "_")


def rollup_bucket(bucket: str) -> str:
    """2.x: the bucket of `bucket`'s rollups."""
    return f"{bucket}_{ROLLUP_RETENTION_POLICY}"


def rollup_task_name(bucket: str) -> str:
    return f"{_PREFIX}_{bucket}"


def _flux(value: str) -> str:
    """A Flux string literal."""
    return json.dumps(value)


def _field_filter(pairs: Iterable[tuple[str, str]]) -> str:
    """A Flux predicate: the row is one of these (measurement, field) pairs."""
    keys = sorted(f"{measurement}/{field}" for measurement, field in pairs)
    listed = ", ".join(_flux(key) for key in keys)
    return (
        f'(r) => contains(value: r._measurement + "/" + r._field, set: [{listed}])'
        if keys
        else "(r) => false"
    )


def rollup_task(catalogue: TypeCatalogue, bucket: str, every_s: int) -> str:
    """2.x: the Flux of the task that rolls `bucket`'s readings up into its rollup bucket,
    the last two hours each run (as 1.x's RESAMPLE ... FOR 2h)."""
    return "\n".join(
        [
            'import "date"',
            "",
            f"option task = {{name: {_flux(rollup_task_name(bucket))}, every: {every_s}s}}",
            "",
            f"start = date.truncate(t: -{ROLLUP_WINDOW_S}s, unit: 1h)",
            "stop = now()",
            _rollup_flux(catalogue, bucket),
        ]
    )


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rollup_backfill(catalogue: TypeCatalogue, bucket: str, start_ms: int, stop_ms: int) -> str:
    """2.x: the task's rollup of the hours from `start_ms` to `stop_ms` (hour-aligned)."""
    return "\n".join(
        [
            f"start = {_rfc3339(start_ms)}",
            f"stop = {_rfc3339(stop_ms)}",
            _rollup_flux(catalogue, bucket),
        ]
    )


def _rollup_flux(catalogue: TypeCatalogue, bucket: str) -> str:
    """The rollup of `bucket`'s readings from `start` to `stop` (defined before it)."""
    numbers, booleans = [], []
    for name in catalogue.names:
        spec = catalogue.get(name)
        assert spec is not None
        numbers += [(name, metric) for metric in _numbers(spec)]
        booleans += [(name, metric) for metric in sorted(spec.booleans)]
    into = _flux(rollup_bucket(bucket))
    return "\n".join(
        [
            f"raw = from(bucket: {_flux(bucket)}) |> range(start: start, stop: stop)",
            f"numbers = raw |> filter(fn: {_field_filter(numbers)})",
            f"booleans = raw |> filter(fn: {_field_filter(booleans)})",
            "hourly = (tables=<-, fn, suffix) => tables",
            '    |> aggregateWindow(every: 1h, fn: fn, createEmpty: false, timeSrc: "_start")',
            "    |> map(fn: (r) => ({r with _field: r._field + suffix}))",
            "",
            f'numbers |> hourly(fn: mean, suffix: "_mean") |> to(bucket: {into})',
            f'numbers |> hourly(fn: min, suffix: "_min") |> to(bucket: {into})',
            f'numbers |> hourly(fn: max, suffix: "_max") |> to(bucket: {into})',
            f'numbers |> hourly(fn: count, suffix: "_count") |> to(bucket: {into})',
            f'booleans |> hourly(fn: count, suffix: "_count") |> to(bucket: {into})',
            "// As on 1.x, where the continuous query of the trues finds no row: an hour",
            "// without a true reading has no _true field.",
            "booleans",
            "    |> filter(fn: (r) => r._value == true)",
            "    |> map(fn: (r) => ({r with _value: 1}))",
            '    |> hourly(fn: sum, suffix: "_true")',
            f"    |> to(bucket: {into})",
            "",
        ]
    )
