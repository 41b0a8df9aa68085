"""`iotgw influx setup` against real InfluxDB 1.6.7 and 2.7: retention as configured, and
hourly rollups that InfluxDB itself makes (continuous queries, a task) with the right values."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.adapters.influx import InfluxClient
from gateway.cli.app import app
from gateway.clock import now_ms
from gateway.domain.rollups import DAY_S, ROLLUP_RETENTION_POLICY, go_duration_s, rollup_bucket
from gateway.services.influx_setup import setup_influx
from gateway.settings import Settings
from tests.conftest import unique
from tests.support import influx_rows, own_settings, quiet, set_up

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000


async def retention_s(settings: Settings) -> tuple[int | None, int | None]:
    """How long the raw readings and the rollups are kept, as InfluxDB reports it."""
    db = settings.influx_database
    async with InfluxClient.for_settings(settings) as influx:
        if influx.v2:
            return (
                await influx.bucket_retention_s(db),
                await influx.bucket_retention_s(rollup_bucket(db)),
            )
        policies = await influx.rows(f'SHOW RETENTION POLICIES ON "{db}"')
    raw = next(go_duration_s(str(row[1])) for row in policies if row[4])
    rollup = next(
        go_duration_s(str(row[1])) for row in policies if row[0] == ROLLUP_RETENTION_POLICY
    )
    return raw, rollup


async def test_setup_keeps_data_as_long_as_configured_and_runs_again_unchanged(
    any_influx: Settings,
) -> None:
    """Retention is what the settings say; a second run changes nothing; a new retention
    is applied to the existing database or bucket."""
    s = await own_settings(
        any_influx, influx_retention=7 * DAY_S, influx_rollup_retention=365 * DAY_S
    )
    async with set_up(s):
        assert await retention_s(s) == (7 * DAY_S, 365 * DAY_S)
        again = await setup_influx(s, quiet)
        assert all("created" not in line and "updated" not in line for line in again.lines)
        assert not [line for line in again.lines if "was " in line]
        longer = s.model_copy(update={"influx_retention": 30 * DAY_S})
        await setup_influx(longer, quiet)
        assert await retention_s(s) == (30 * DAY_S, 365 * DAY_S)


def soil_types(folder: Path) -> Path:
    """A user type with a float, an int and a boolean metric."""
    path = folder / "types.yaml"
    path.write_text(
        "types:\n"
        "  - name: soil_probe\n"
        "    metrics:\n"
        "      - {name: moisture, unit: pct, kind: float, min: 0, max: 100}\n"
        "      - {name: ec, kind: int, min: 0, max: 20000}\n"
        "      - {name: leak, kind: bool}\n"
    )
    return path


async def test_influxdb_rolls_each_hour_of_each_device_up_by_itself(
    any_influx: Settings, tmp_path: Path
) -> None:
    """A known series in the last hour: InfluxDB's own rollup has each device's mean, min,
    max and count per number (float and int) and the count and trues per boolean."""
    s = await own_settings(any_influx, influx_rollup_every=1, types_file=soil_types(tmp_path))
    hour = (now_ms() // HOUR_MS - 1) * HOUR_MS
    moisture, ec, leak = (
        [30.0, 35.5, 41.0, 28.5],
        [900, 1200, 1500, 1000],
        [True, False, True, True],
    )
    a, b = unique("soil"), unique("soil")
    lines = [
        f"soil_probe,device_id={a},site=garden,room=bed moisture_pct={m},ec={e}i,"
        f"leak={str(w).lower()},seq={i}i {hour + i * 600_000}"
        for i, (m, e, w) in enumerate(zip(moisture, ec, leak, strict=True))
    ]
    lines.append(
        f"soil_probe,device_id={b},site=garden moisture_pct=50.0,ec=2000i,leak=false {hour}"
    )
    async with set_up(s):
        async with InfluxClient.for_settings(s) as influx:
            await influx.write(s.influx_database, "\n".join(lines))
        query = (
            "SELECT moisture_pct_mean, moisture_pct_min, moisture_pct_max, moisture_pct_count, "
            "ec_mean, ec_min, "
            'ec_max, ec_count, leak_count, leak_true, site, room FROM "rollup"."soil_probe" '
            f"WHERE device_id = '{{device}}' AND time >= {hour - HOUR_MS}ms"
        )
        rows: dict[str, Any] = {}

        async def rolled_up() -> bool:
            """Both devices' hour, with every reading counted and the trues' run done."""
            rows[a] = await influx_rows(s, query.format(device=a))
            rows[b] = await influx_rows(s, query.format(device=b))
            return bool(rows[a] and rows[a][0][10] == 3 and rows[b] and rows[b][0][9] == 1)

        await until_async(rolled_up, 60, "InfluxDB's rollup of the hour")
    assert rows[a] == [[hour, 33.75, 28.5, 41.0, 4, 1150.0, 900, 1500, 4, 4, 3, "garden", "bed"]]
    assert rows[b] == [[hour, 50.0, 50.0, 50.0, 1, 2000.0, 2000, 2000, 1, 1, None, "garden", None]]


async def until_async(check: Any, timeout_s: float, what: str) -> None:
    """Until the async `check` is true (it asks InfluxDB each time)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.5)


async def test_influx_setup_command_sets_up_and_says_what_it_did(any_influx: Settings) -> None:
    """`iotgw influx setup` prints the retention and the rollups and exits 0."""
    s = await own_settings(any_influx)
    try:
        result = await asyncio.to_thread(
            CliRunner().invoke, app, ["influx", "setup"], env=s.environment()
        )
        assert result.exit_code == 0, result.output
        assert "kept 30d" in result.output
        assert "kept 2y" in result.output
        assert "is set up" in result.output
    finally:
        async with set_up(s):
            pass


async def test_influx_setup_command_on_an_unreachable_server_says_so_in_one_line(
    settings: Settings,
) -> None:
    """No InfluxDB at the URL: one line naming it, exit 1, no traceback."""
    env = {**settings.environment(), "IOTGW_INFLUX_URL": "http://127.0.0.1:9"}
    result = await asyncio.to_thread(CliRunner().invoke, app, ["influx", "setup"], env=env)
    assert result.exit_code == 1
    assert result.stderr.strip() == "iotgw: error: InfluxDB does not answer at http://127.0.0.1:9"


def thermostat_lines(device: str, hour: int) -> str:
    """Two readings of a thermostat in the hour starting at `hour`."""
    return (
        f"thermostat,device_id={device} temperature_c=20.0,heating=true {hour + 60_000}\n"
        f"thermostat,device_id={device} temperature_c=22.0,heating=false {hour + 120_000}"
    )


ROLLUP_OF_TWO = (
    "SELECT temperature_c_mean, temperature_c_min, temperature_c_max, temperature_c_count, "
    'heating_count, heating_true FROM "rollup"."thermostat" WHERE device_id = \'{device}\''
)


async def test_setup_keeps_older_readings_until_told_then_rolls_them_up_first(
    any_influx: Settings,
) -> None:
    """Readings 40 days old, raw retention 30d: setup keeps the longer retention and says
    how to apply it; with --shorten their hour is rolled up, then the retention is set."""
    s = await own_settings(any_influx)
    device, hour = unique("thermo"), (now_ms() // HOUR_MS - 40 * 24) * HOUR_MS
    async with InfluxClient.for_settings(s) as influx:
        await influx.write(s.influx_database, thermostat_lines(device, hour))
    async with set_up(s):
        kept = await setup_influx(s, quiet)
        assert (await retention_s(s))[0] == 0
        [raw] = [line for line in kept.lines if line.startswith("raw readings")]
        assert raw.endswith(
            "kept forever, not 30d: it holds readings older than 30d, which that would "
            "delete; `iotgw influx setup --shorten` rolls them up, then sets it"
        )
        assert await influx_rows(s, ROLLUP_OF_TWO.format(device=device)) == []
        shortened = await setup_influx(s, quiet, shorten=True)
        assert (await retention_s(s))[0] == 30 * DAY_S
        assert "rolled up first" in shortened.lines[-1]
        rolled = await influx_rows(s, ROLLUP_OF_TWO.format(device=device))
    assert rolled == [[hour, 21.0, 20.0, 22.0, 2, 2, 1]]


async def test_rollup_command_makes_the_hours_the_rollups_missed(any_influx: Settings) -> None:
    """A reading 5 hours old (out of the two hours InfluxDB recomputes): `iotgw influx
    rollup --since 1d` rolls its hour up; a bad --since is one line, exit 2."""
    s = await own_settings(any_influx)
    device, hour = unique("thermo"), (now_ms() // HOUR_MS - 5) * HOUR_MS
    async with set_up(s):
        async with InfluxClient.for_settings(s) as influx:
            await influx.write(s.influx_database, thermostat_lines(device, hour))
        env = s.environment()
        runner = CliRunner()
        result = await asyncio.to_thread(
            runner.invoke, app, ["influx", "rollup", "--since", "1d"], env=env
        )
        assert result.exit_code == 0, result.output
        assert "rolled up 25 hours" in result.output
        rolled = await influx_rows(s, ROLLUP_OF_TWO.format(device=device))
        bad = await asyncio.to_thread(
            runner.invoke, app, ["influx", "rollup", "--since", "soon"], env=env
        )
    assert rolled == [[hour, 21.0, 20.0, 22.0, 2, 2, 1]]
    assert bad.exit_code == 2
    assert (
        bad.stderr.strip()
        == "iotgw: error: --since: a duration is a number and a unit: 36h, 7d, 8w"
    )
