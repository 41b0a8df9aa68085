"""`iotgw influx`: the InfluxDB database or bucket, its retention and hourly rollups."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from gateway.cli.terminal import console, say
from gateway.domain.rollups import duration_s
from gateway.errors import IotgwError
from gateway.services.influx_setup import rollup_history, setup_influx
from gateway.settings import load_settings

__all__ = ["influx_app"]

influx_app = typer.Typer(help="InfluxDB: retention and hourly rollups.", no_args_is_help=True)


@influx_app.command("setup")
def influx_setup(
    shorten: Annotated[
        bool,
        typer.Option(
            help="Also apply a raw retention shorter than the readings already kept: they "
            "are rolled up first, then InfluxDB deletes them."
        ),
    ] = False,
) -> None:
    """Create or update the database (1.x) or bucket (2.x), the raw readings' retention
    (IOTGW_INFLUX_RETENTION), the hourly rollups' (IOTGW_INFLUX_ROLLUP_RETENTION) and what
    makes them: continuous queries on 1.x, a task on 2.x. Safe to run again; run it again
    after changing the types file."""
    settings = load_settings()
    done = asyncio.run(setup_influx(settings, say, shorten=shorten))
    console.print(
        f"InfluxDB {done.version}.x at {settings.influx_url} is set up "
        f"({settings.influx_database})",
        soft_wrap=True,
        highlight=False,
    )


@influx_app.command("rollup")
def influx_rollup(
    since: Annotated[
        str, typer.Option(help="How far back: the hours since then are rolled up again.")
    ] = "2d",
) -> None:
    """Make the hourly rollups of past hours from the raw readings: after an outage of
    InfluxDB or the writer longer than the two hours InfluxDB recomputes by itself."""
    try:
        seconds = duration_s(since)
    except ValueError as exc:
        raise IotgwError(f"--since: {exc}", exit_code=2) from None
    settings = load_settings()
    hours = asyncio.run(rollup_history(settings, say, seconds))
    console.print(f"rolled up {hours:,} hours ({settings.influx_database})", highlight=False)
