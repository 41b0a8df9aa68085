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
from simulators.fleet import (
    DROP_S,
    ENVELOPE_ONLY_FAULTS,
    FleetFormat,
    check_types,
    parse_faults,
)
from simulators.formats import is_base_topic
from simulators.runner import audit_table, run_simulation

__all__ = ["simulate_app"]

# Its commands are top-level ones: `iotgw simulate`, `iotgw audit`.
simulate_app = typer.Typer()

_FAULTS_HELP = (
    "Fault rates per reading, e.g. malformed=0.01,duplicate=0.02. In every format: "
    "malformed (cut JSON), schema (a value out of range), unknown_device, "
    "clock_skew (the device clock an hour ahead), oversize, duplicate, out_of_order, burst, "
    "offline, drop (after the reading the device's connection drops without DISCONNECT, so "
    "the broker publishes its last will, offline; it is back online "
    f"{DROP_S[0]:g} to {DROP_S[1]:g} s later); envelope devices only: "
    f"{', '.join(sorted(ENVELOPE_ONLY_FAULTS))}."
)
_FORMAT_HELP = (
    "What the devices publish: envelope (ours, devices/ID/telemetry, every type); "
    "zigbee2mqtt (BASE_TOPIC/FRIENDLY_NAME state with last_seen, every type); tasmota "
    "(tele/TOPIC/SENSOR and STATE, plugs and climate sensors, at most one reading a second "
    "each); shelly (Gen2 ID/events/rpc NotifyStatus, plugs and climate sensors); mixed (a "
    "home: Zigbee sensors, Tasmota and Shelly plugs, envelope devices). The bridge reads "
    "the formats other than envelope when its sources file lists their adapters (see "
    "simulators/demo-sources.yaml)."
)


@simulate_app.command("simulate")
def simulate_command(
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="Devices in the fleet.")] = 50,
    rate: Annotated[
        float, typer.Option(min=0.1, max=100_000, help="Readings per second, whole fleet.")
    ] = 50.0,
    duration: Annotated[float, typer.Option(min=0.1, max=86_400, help="Seconds to run.")] = 60.0,
    qos: Annotated[int, typer.Option(min=0, max=1, help="MQTT QoS of the readings.")] = 1,
    faults: Annotated[str, typer.Option(help=_FAULTS_HELP)] = "",
    register: Annotated[bool, typer.Option(help="Register the fleet first.")] = False,
    log: Annotated[Path | None, typer.Option(help="Write one JSON line per reading sent.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same fleet and signals.")] = 1,
    batch_size: Annotated[
        int, typer.Option(min=1, max=100, help="Readings per message (envelope devices).")
    ] = 1,
    fleet_format: Annotated[
        FleetFormat, typer.Option("--format", help=_FORMAT_HELP)
    ] = FleetFormat.ENVELOPE,
    z2m_base_topic: Annotated[
        str, typer.Option(help="Zigbee2MQTT's base_topic, for its devices.")
    ] = "zigbee2mqtt",
    device_types: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            help="A device type the fleet plays, in turn with the others given (repeat it); "
            "default: every built-in type the format plays. Types of the types file "
            "(IOTGW_TYPES_FILE) play as our envelope.",
        ),
    ] = None,
) -> None:
    """Play a fleet of devices against the configured MQTT broker (bounded in time)."""
    settings = load_settings()
    if not is_base_topic(z2m_base_topic):
        raise IotgwError("--z2m-base-topic: MQTT topic levels without wildcards", exit_code=2)
    try:
        fault_rates = parse_faults(faults, fleet_format.value)
        check_types(device_types, fleet_format.value, settings.catalogue())
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
            fleet_format=fleet_format.value,
            base_topic=z2m_base_topic,
            types=device_types,
        )
    )
    faulted = ", ".join(f"{k} {v}" for k, v in sorted(stats.faults.items())) or "none"
    formats = ", ".join(f"{k} {v}" for k, v in sorted(stats.formats.items())) or "none"
    dropped = (
        f"; devices dropped out {stats.drops.total()} times, back online {stats.returns.total()}"
        if stats.drops
        else ""
    )
    console.print(
        f"sent {stats.readings} readings in {stats.messages} messages over {stats.seconds:.1f} s "
        f"({stats.readings / max(stats.seconds, 0.001):.0f}/s); as {formats}; faults: {faulted}"
        f"{dropped}",
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
