"""`iotgw simulate` and `iotgw audit`: a simulated fleet, and what became of its readings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.terminal import console
from gateway.errors import IotgwError
from gateway.settings import load_settings
from simulators.audit import SendLog, audit_until_settled
from simulators.fleet import parse_faults
from simulators.runner import audit_table, run_simulation

__all__ = ["simulate_app"]

# Its commands are top-level ones: `iotgw simulate`, `iotgw audit`.
simulate_app = typer.Typer()


@simulate_app.command("simulate")
def simulate_command(
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="Devices in the fleet.")] = 50,
    rate: Annotated[
        float, typer.Option(min=0.1, max=100_000, help="Readings per second, whole fleet.")
    ] = 50.0,
    duration: Annotated[float, typer.Option(min=0.1, max=86_400, help="Seconds to run.")] = 60.0,
    qos: Annotated[int, typer.Option(min=0, max=1, help="MQTT QoS of the readings.")] = 1,
    faults: Annotated[
        str, typer.Option(help="Fault rates per reading, e.g. malformed=0.01,duplicate=0.02.")
    ] = "",
    register: Annotated[bool, typer.Option(help="Register the fleet first.")] = False,
    log: Annotated[Path | None, typer.Option(help="Write one JSON line per reading sent.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same fleet and signals.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, max=100, help="Readings per message.")] = 1,
) -> None:
    """Play a fleet of devices against the configured MQTT broker (bounded in time)."""
    settings = load_settings()
    try:
        fault_rates = parse_faults(faults)
    except ValueError as exc:
        raise IotgwError(str(exc), exit_code=2) from None
    stats = asyncio.run(
        run_simulation(
            settings,
            devices=devices,
            rate=rate,
            duration=duration,
            qos=qos,
            faults=fault_rates,
            register=register,
            log=log,
            seed=seed,
            batch_size=batch_size,
        )
    )
    faulted = ", ".join(f"{k} {v}" for k, v in sorted(stats.faults.items())) or "none"
    console.print(
        f"sent {stats.readings} readings in {stats.messages} messages over {stats.seconds:.1f} s "
        f"({stats.readings / max(stats.seconds, 0.001):.0f}/s); faults: {faulted}",
        highlight=False,
        soft_wrap=True,
    )


@simulate_app.command("audit")
def audit_command(
    log: Annotated[Path, typer.Option(help="The log of `iotgw simulate --log`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the pipeline to catch up.")
    ] = 0.0,
) -> None:
    """Compare what a simulation sent with iot.readings, iot.readings.dlq and InfluxDB.

    Exits 1 when a valid reading is in neither topic, or is more than one point in InfluxDB.
    """
    settings = load_settings()
    report = asyncio.run(audit_until_settled(settings, SendLog.read(log), wait))
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        console.print(audit_table(report))
    if report.lost or report.duplicates_in_influx:
        raise typer.Exit(1)
