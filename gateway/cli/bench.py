"""`iotgw bench`: the end-to-end benchmark (simulators/bench/, from a checkout)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.terminal import console, say
from gateway.errors import IotgwError
from gateway.settings import load_settings
from simulators.bench import DEFAULT_RUNS, RUNS

__all__ = ["bench_app"]

# Its command is a top-level one: `iotgw bench`.
bench_app = typer.Typer()


@bench_app.command("bench")
def bench_command(
    readings: Annotated[int, typer.Option(min=100, help="Backlog to drain per run.")] = 200_000,
    live: Annotated[int, typer.Option(min=10, help="Readings published live per run.")] = 50_000,
    rates: Annotated[str, typer.Option(help="Fixed rates for the latency runs.")] = "1000,5000",
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds per latency run.")] = 5.0,
    runs: Annotated[
        str, typer.Option(help=f"Which runs, comma-separated, of {', '.join(RUNS)}.")
    ] = ",".join(DEFAULT_RUNS),
    out: Annotated[Path, typer.Option(help="Where latest.json and latest.png go.")] = Path(
        "bench-results"
    ),
    profile: Annotated[
        bool, typer.Option(help="Sample iotgw's drain with py-spy: the time per stage.")
    ] = False,
) -> None:
    """iotgw against a tuned Telegraf and the ceilings (Mosquitto, Kafka); the writer into
    InfluxDB 1.6.7 and 2.7, each beside its ceiling; the rules engine."""
    settings = load_settings()
    chosen = [r.strip() for r in runs.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in RUNS]
    if unknown or not chosen:
        raise IotgwError(f"runs must be among {', '.join(RUNS)}", exit_code=2)
    try:
        rate_values = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        raise IotgwError("--rates takes numbers, like 1000,5000", exit_code=2) from None
    try:
        from simulators.bench.harness import aims_table, bench, bench_table, profile_table
    except ImportError as exc:
        raise IotgwError(
            f"the benchmark runs from a checkout of iotgw with its dev tools ({exc})"
        ) from None

    logging.getLogger("gmqtt").setLevel(logging.CRITICAL)
    results = asyncio.run(
        bench(
            settings,
            readings=readings,
            live=live,
            rates=rate_values,
            seconds=seconds,
            runs=chosen,
            out=out,
            report=say,
            profile=profile,
        )
    )
    console.print(bench_table(results))
    if (profiled := profile_table(results)) is not None:
        console.print(profiled)
    console.print(aims_table(results))
    console.print(f"results: {out / 'latest.json'}, chart: {out / 'latest.png'}", highlight=False)
