"""What `iotgw influx setup` asks InfluxDB to run: durations, continuous queries, the task."""

from __future__ import annotations

from gateway.domain.rollups import (
    continuous_queries,
    influxql_duration,
    rollup_task,
    shown_duration,
)
from schemas.types import BUILTIN_CATALOGUE, parse_types


def test_durations_are_shown_and_written_in_influxql_without_years() -> None:
    """2y is 730 days: InfluxQL has no years; 0 is kept forever (INF)."""
    assert [shown_duration(s) for s in (0, 3600, 30 * 86400, 730 * 86400, 90)] == [
        "forever", "1h", "30d", "2y", "90s",
    ]  # fmt: skip
    assert [influxql_duration(s) for s in (0, 30 * 86400, 730 * 86400, 14 * 86400)] == [
        "INF", "30d", "730d", "2w",
    ]  # fmt: skip


def test_each_type_gets_a_query_of_its_numbers_and_one_per_boolean() -> None:
    """Numbers: mean, min, max, count; booleans: count, and the trues in a query of their
    own; never the reading's seq."""
    queries = {
        q.name: q.statement for q in continuous_queries(BUILTIN_CATALOGUE, "iot", "autogen", 600)
    }
    assert set(queries) == {
        "iotgw_rollup_thermostat", "iotgw_rollup_thermostat_heating_true",
        "iotgw_rollup_air_quality", "iotgw_rollup_motion", "iotgw_rollup_motion_motion_true",
        "iotgw_rollup_contact", "iotgw_rollup_contact_open_true", "iotgw_rollup_smart_plug",
        "iotgw_rollup_smart_plug_on_true", "iotgw_rollup_climate",
    }  # fmt: skip
    contact = queries["iotgw_rollup_contact"]
    assert contact == (
        'CREATE CONTINUOUS QUERY "iotgw_rollup_contact" ON "iot" RESAMPLE EVERY 10m FOR 2h '
        'BEGIN SELECT mean("battery_pct") AS "battery_pct_mean", min("battery_pct") AS '
        '"battery_pct_min", max("battery_pct") AS "battery_pct_max", count("battery_pct") AS '
        '"battery_pct_count", count("open") AS "open_count" INTO "iot"."rollup"."contact" '
        'FROM "iot"."autogen"."contact" GROUP BY time(1h), * END'
    )
    assert queries["iotgw_rollup_contact_open_true"].endswith(
        'SELECT count("open") AS "open_true" INTO "iot"."rollup"."contact" FROM '
        '"iot"."autogen"."contact" WHERE "open" = true GROUP BY time(1h), * END'
    )
    assert not any('"seq"' in statement for statement in queries.values())


def test_the_task_rolls_up_user_types_into_the_rollup_bucket() -> None:
    """A type of the types file is in the task's field sets; it writes to `<bucket>_rollup`."""
    catalogue = parse_types(
        "types:\n  - name: soil_probe\n    metrics:\n"
        "      - {name: ec, kind: int}\n      - {name: leak, kind: bool}\n"
    )
    flux = rollup_task(catalogue, "home", 60)
    assert 'option task = {name: "iotgw_rollup_home", every: 60s}' in flux
    assert 'from(bucket: "home")' in flux
    assert 'to(bucket: "home_rollup")' in flux
    assert '"soil_probe/ec"' in flux.split("numbers = ")[1].split("\n")[0]
    assert '"soil_probe/leak"' in flux.split("booleans = ")[1].split("\n")[0]
