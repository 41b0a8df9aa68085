"""Simulation and audit for people: registration, live progress, summary tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from rich.live import Live
from rich.table import Table

from gateway.cli.terminal import console
from gateway.clock import now_ms
from gateway.services.registry import RegistryWriter
from gateway.settings import Settings
from simulators.audit import AuditReport
from simulators.fleet import FleetTraffic, SimDevice, build_fleet
from simulators.simulate import SimulationStats, simulate

ExtraRows = Callable[[], list[tuple[str, str]]]


def progress_table(stats: SimulationStats, extra: ExtraRows | None = None) -> Table:
    table = Table("", "", title="iotgw simulate", show_header=False)
    seconds = max(stats.seconds, 0.001)
    table.add_row("elapsed", f"{stats.seconds:.0f} s")
    table.add_row("readings sent", f"{stats.readings} ({stats.readings / seconds:.0f}/s)")
    if len(stats.formats) > 1:
        for fmt, count in sorted(stats.formats.items()):
            table.add_row(f"  as {fmt}", str(count))
    for fault, count in sorted(stats.faults.items()):
        table.add_row(f"  with fault {fault}", str(count))
    if stats.drops:
        drops, returns = stats.drops.total(), stats.returns.total()
        table.add_row("devices dropped out", f"{drops} times, back online {returns}")
    for label, value in extra() if extra else []:
        table.add_row(label, value)
    return table


async def run_simulation(
    settings: Settings,
    *,
    devices: int,
    rate: float,
    duration: float,
    qos: int,
    faults: dict[str, float],
    register: bool,
    log: Path | None,
    seed: int,
    batch_size: int = 1,
    extra: ExtraRows | None = None,
    fleet_format: str = "envelope",
    base_topic: str = "zigbee2mqtt",
    types: list[str] | None = None,
    newcomers: Sequence[SimDevice] = (),
) -> SimulationStats:
    """Build the fleet (its devices speaking `fleet_format`, see simulators.fleet), register
    it if asked, and run it with live progress on a terminal. `newcomers` play along
    from their `joins_at`, never registered: devices paired mid-run."""
    fleet = build_fleet(
        devices,
        seed,
        fleet_format,
        base_topic=base_topic,
        types=types,
        catalogue=settings.catalogue(),
    )
    if register:
        async with RegistryWriter(settings) as writer:
            await writer.put(*(device.record() for device in fleet))
        console.print(f"registered {len(fleet)} devices", highlight=False)
    # Runs never reuse a (device, seq) pair: sequences start from the start time.
    traffic = FleetTraffic(
        [*fleet, *newcomers], faults, seed, first_seq=now_ms(), batch_size=batch_size
    )
    with ExitStack() as stack:
        out = stack.enter_context(log.open("w")) if log is not None else None
        if console.is_terminal:
            live = stack.enter_context(Live(console=console, refresh_per_second=4))

            def show(stats: SimulationStats) -> None:
                live.update(progress_table(stats, extra))

            return await simulate(
                settings, traffic, rate=rate, duration=duration, qos=qos, log=out, on_progress=show
            )
        return await simulate(settings, traffic, rate=rate, duration=duration, qos=qos, log=out)


def audit_table(report: AuditReport) -> Table:
    table = Table("", "", title="iotgw audit", show_header=False)
    table.add_row("readings sent", str(report.sent))
    table.add_row("valid readings sent", str(report.valid_sent))
    table.add_row("valid readings in iot.readings", str(report.in_kafka))
    table.add_row("dead letters (iot.readings.dlq)", str(report.in_dlq))
    for reason, count in report.rejected.items():
        expected = report.expected_rejected.get(reason)
        table.add_row(
            f"  {reason}", f"{count}" + (f" (faults sent: {expected})" if expected else "")
        )
    if report.held:
        table.add_row("held for approval (iot.readings.pending)", str(report.held))
    table.add_row("valid readings in InfluxDB", str(report.in_influx))
    table.add_row("missing in InfluxDB", str(report.missing_in_influx))
    table.add_row("duplicates in InfluxDB", str(report.duplicates_in_influx))
    table.add_row(
        "duplicates in iot.readings",
        f"{report.duplicates} (sent twice on purpose: {report.duplicates_sent})",
    )
    lost = (
        "[green]0[/green]"
        if not report.lost
        else f"[red]{report.lost}[/red] e.g. {', '.join(report.lost_examples)}"
    )
    table.add_row("lost", lost)
    return table
