"""`iotgw influx`: the InfluxDB database or bucket, its retention and hourly rollups."""

from __future__ import annotations

import asyncio

import typer

from gateway.cli.terminal import console, say
from gateway.services.influx_setup import setup_influx
from gateway.settings import load_settings

__all__ = ["influx_app"]

influx_app = typer.Typer(help="InfluxDB: retention and hourly rollups.", no_args_is_help=True)


@influx_app.command("setup")
def influx_setup() -> None:
    """Create or update the database (1.x) or bucket (2.x), the raw readings' retention
    (IOTGW_INFLUX_RETENTION), the hourly rollups' (IOTGW_INFLUX_ROLLUP_RETENTION) and what
    makes them: continuous queries on 1.x, a task on 2.x. Safe to run again; run it again
    after changing the types file."""
    settings = load_settings()
    done = asyncio.run(setup_influx(settings, say))
    console.print(
        f"InfluxDB {done.version}.x at {settings.influx_url} is set up "
        f"({settings.influx_database})",
        soft_wrap=True,
        highlight=False,
    )
