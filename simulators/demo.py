"""`make demo`: a smart-home fleet through the whole pipeline, with live figures and an audit.

    python -m simulators.demo --devices 50 --duration 60

Expects the local stack (`iotgw stack up`). Registers the fleet, a home of Zigbee2MQTT
sensors, Tasmota and Shelly plugs and sensors and our own envelope devices; runs the
bridge (reading the sources of demo-sources.yaml) and the writer (`iotgw run all`) as a
child process, plays the fleet with a few faults, audits that nothing valid was lost,
prints what to look at next, and stops the services. The stack keeps running (stop it
with `make stack-down`).

Onboarding: a third of the way in, a Zigbee sensor nobody registered joins Zigbee2MQTT;
the bridge holds its readings (demo-sources.yaml: `unknown_devices: hold`). Two thirds of
the way in the demo lists it as pending and approves it with `iotgw devices approve`, as a
user would; the audit then finds every reading it sent in iot.readings, the held ones
replayed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shlex
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from devstack.stack import DEFAULT_STACK_DIR
from gateway.adapters.kafka import ensure_topics
from gateway.cli.terminal import console, print_error, say
from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.services.bridge.pending import read_pending
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from schemas import DeviceType
from schemas.types import TypeCatalogue
from simulators.audit import AuditReport, SendLog, audit, audit_until_settled, read_since
from simulators.fleet import DEMO_FAULTS, SITES, SimDevice, parse_faults
from simulators.formats import Firmware, Format
from simulators.models import model_for
from simulators.processes import ServiceProcess
from simulators.runner import audit_table, run_simulation

DEMO_RULES = Path(__file__).with_name("demo-rules.yaml")
# The adapters of the demo's home: its fleet speaks Zigbee2MQTT, Tasmota and Shelly too.
DEMO_SOURCES = Path(__file__).with_name("demo-sources.yaml")


class ServiceFigures:
    """Reads the bridge's and the writer's Prometheus metrics, with rates between reads."""

    def __init__(self, bridge_url: str, writer_url: str) -> None:
        self.urls = {"bridge": bridge_url, "writer": writer_url}
        self._previous: dict[str, tuple[float, float]] = {}

    def sample(self) -> list[tuple[str, dict[str, str], float]]:
        samples: list[tuple[str, dict[str, str], float]] = []
        for url in self.urls.values():
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                samples.extend((s.name, s.labels, s.value) for s in family.samples)
        return samples

    def rate(self, name: str, value: float) -> float:
        now = time.monotonic()
        before = self._previous.get(name)
        self._previous[name] = (now, value)
        if before is None or now <= before[0]:
            return 0.0
        return (value - before[1]) / (now - before[0])

    def rows(self) -> list[tuple[str, str]]:
        samples = self.sample()

        def total(name: str) -> float:
            return sum(value for sample, _, value in samples if sample == name)

        published = total("iotgw_bridge_readings_published_total")
        written = total("iotgw_writer_points_written_total")
        rows = [
            ("published to Kafka", f"{published:.0f} ({self.rate('published', published):.0f}/s)"),
            ("written to InfluxDB", f"{written:.0f} ({self.rate('written', written):.0f}/s)"),
        ]
        by_source: dict[str, float] = {}
        for name, labels, value in sorted(samples, key=lambda s: str(s[1])):
            if name == "iotgw_bridge_readings_rejected_total":
                rows.append((f"  rejected: {labels['reason']}", f"{value:.0f}"))
            elif name == "iotgw_bridge_source_readings_total":
                by_source[labels["source"]] = by_source.get(labels["source"], 0) + value
        rows += [(f"  received from {s}", f"{n:.0f}") for s, n in sorted(by_source.items())]
        return rows


# How long the demo waits for the bridge to hold a reading of the paired sensor, once it is
# due to approve it (the sensor sends one or more readings a second).
_HELD_WAIT_S = 30.0


def paired_sensor(joins_at: float, catalogue: TypeCatalogue) -> SimDevice:
    """A Zigbee climate sensor paired mid-run. Zigbee2MQTT names a new device by its IEEE
    address (here with Aqara's prefix) until someone renames it: a new one each run. It
    makes no faults, so that it surely has readings to hold, however short the run."""
    ieee = f"0x00158d00{secrets.token_hex(4)}"
    model = model_for(DeviceType.CLIMATE, random.Random(ieee), catalogue)
    firmware = Firmware(Format.ZIGBEE2MQTT, ieee)
    return SimDevice(ieee, DeviceType.CLIMATE, SITES[0], "garden", model, firmware,
                     joins_at=joins_at, faultless=True)  # fmt: skip


class Onboarding:
    """The paired sensor followed through: its readings held by the bridge, listed as
    pending, approved as a user would, replayed. `rows` give its state to the live figures."""

    def __init__(self, settings: Settings, started_ms: int, joins_at: float,
                 approve_at: float) -> None:  # fmt: skip
        self.settings = settings
        self.device = paired_sensor(joins_at, settings.catalogue())
        self.started_ms = started_ms
        self.approve_at = approve_at
        self.state = "not paired yet"
        self.replayed = 0

    def rows(self) -> list[tuple[str, str]]:
        return [(f"new device {self.device.device_id}", self.state)]

    async def run(self) -> None:
        device = self.device
        await asyncio.sleep(max(0.0, device.joins_at - time.time()))
        self.state = "paired, unknown to the registry: its readings are held"
        say(
            f"a Zigbee sensor nobody registered joins Zigbee2MQTT: {device.device_id}; the "
            f"bridge holds its readings ({DEMO_SOURCES.name}: unknown_devices: hold)"
        )
        table, others = await self._pending()
        console.print(table)
        if others:
            say(
                f"and {others} more since the demo started, among them the ids the fleet's "
                "unknown_device fault makes up: `iotgw devices pending` lists them all"
            )
        await self._approve()

    async def _pending(self) -> tuple[Table, int]:
        """Once due to approve and the bridge holds readings of the sensor: its row of
        `iotgw devices pending`, and how many other devices became pending since the demo
        started."""
        device_id = self.device.device_id
        deadline = self.approve_at + _HELD_WAIT_S
        while True:
            book = await read_pending(self.settings)
            held = book.devices.get(device_id)
            if held is not None and held.count:
                self.state = f"pending: {held.count} readings held"
                if time.time() >= self.approve_at:
                    break
            elif time.time() > deadline:
                raise IotgwError(
                    f"the bridge held no reading of {device_id}: does {DEMO_SOURCES.name} "
                    "hold zigbee2mqtt's unknown devices?"
                )
            await asyncio.sleep(1)
        table = Table(
            "device",
            "source",
            "type (inferred)",
            "held",
            title="pending devices (iotgw devices pending)",
        )
        table.add_row(device_id, held.source, held.type or "?", str(held.count))
        others = sum(
            d.count > 0 and d.first_seen >= self.started_ms and d.device_id != device_id
            for d in book.devices.values()
        )
        return table, others

    async def _approve(self) -> None:
        """`iotgw devices approve` with the inferred type, a name, site and room; waits
        until the bridge replayed the held readings."""
        device = self.device
        args = ["devices", "approve", device.device_id, "--name", "garden sensor",
                "--site", device.site, "--room", device.room]  # fmt: skip
        console.print(f"$ iotgw {shlex.join(args)}", highlight=False, markup=False, soft_wrap=True)
        self.state = "approving"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        said = out.decode(errors="replace")
        for line in said.splitlines():
            console.print(f"  {line}", highlight=False, markup=False)
        if process.returncode:
            reason = (err.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            raise IotgwError(f"approving {device.device_id} failed: {reason}")
        replayed = re.search(r"(\d+)\s+held\s+readings\s+replayed", said)
        if replayed is None:
            raise IotgwError(f"no bridge replayed the held readings of {device.device_id}")
        self.replayed = int(replayed[1])
        self.state = f"approved: {self.replayed} held readings replayed"

    def table(self, report: AuditReport) -> Table:
        """The audit of the sensor's own readings."""
        device = self.device
        table = Table("", "", title="onboarding", show_header=False)
        table.add_row("new device", device.device_id)
        table.add_row("approved as", f"{device.type} in {device.site}, {device.room}")
        table.add_row("readings sent", str(report.sent))
        table.add_row("held, replayed on approval", str(self.replayed))
        table.add_row("valid readings in iot.readings", f"{report.in_kafka} of {report.valid_sent}")
        table.add_row(
            "duplicates in iot.readings",
            f"{report.duplicates} (sent twice on purpose: {report.duplicates_sent})",
        )
        table.add_row("valid readings in InfluxDB", str(report.in_influx))
        table.add_row(
            "lost", "[green]0[/green]" if not report.lost else f"[red]{report.lost}[/red]"
        )
        return table


async def start_services(settings: Settings, log: Path) -> tuple[ServiceProcess, ServiceFigures]:
    """`iotgw run all` in the background, once all three services are ready."""
    # Short durations, so that a one-minute run fires every kind of rule.
    if "IOTGW_RULES_FILE" not in os.environ:
        settings = settings.model_copy(update={"rules_file": DEMO_RULES})
    # Always the demo's sources: its fleet is lost to a bridge that does not read them.
    settings = settings.model_copy(update={"sources_file": DEMO_SOURCES})
    services = ServiceProcess("all", settings, log).start()
    try:
        await services.ready()
    except IotgwError:
        services.kill()
        raise
    bridge, writer, *_ = services.urls
    return services, ServiceFigures(f"{bridge}/metrics", f"{writer}/metrics")


async def alerts_table(settings: Settings, since_ms: int, until_ms: int) -> Table:
    """The alerts fired from `since_ms` to `until_ms` by rule, and how many of them
    resolved (committed records of iot.alerts). The fleet says it is offline when it stops:
    the `offline` alerts that fire then, and resolve when the next run starts, are left out."""
    records = await read_since(
        settings, Topics(settings.topic_prefix).alerts, since_ms, committed_only=True
    )
    counts: Counter[tuple[str, str]] = Counter()
    fired: set[tuple[str, str]] = set()
    # A device's alerts are in order (iot.alerts is keyed by device).
    for alert in (json.loads(r.value) for r in records):
        rule, pair = alert["rule"], (alert["rule"], alert["device_id"])
        if alert["state"] == "firing":
            if since_ms <= alert["ts"] <= until_ms:
                fired.add(pair)
                counts[(rule, "firing")] += 1
        elif pair in fired:
            fired.discard(pair)
            counts[(rule, "resolved")] += 1
    table = Table("rule", "firing", "resolved", title="alerts of the run (iot.alerts)")
    for rule in sorted({rule for rule, _ in counts}):
        table.add_row(rule, str(counts[(rule, "firing")]), str(counts[(rule, "resolved")]))
    return table


def next_steps(settings: Settings, onboarded: str) -> None:
    url = str(settings.influx_url).rstrip("/")
    db = settings.influx_database
    console.print("\n[bold]What to look at next[/bold]")
    console.print(
        f"""\
  Room climate from the Zigbee, Tasmota and Shelly sensors, minute by minute:
    curl -sG {url}/query --data-urlencode db={db} \\
      --data-urlencode 'q=SELECT mean("temperature_c"), mean("humidity_pct") FROM "climate"
        WHERE time > now() - 10m GROUP BY time(1m), "device_id"'
  The plugs' power and energy (Tasmota, Shelly; Shelly's Wh arrive as kWh):
    curl -sG {url}/query --data-urlencode db={db} \\
      --data-urlencode 'q=SELECT last("power_w"), last("energy_kwh") FROM "smart_plug"
        WHERE time > now() - 10m GROUP BY "device_id"'
  Readings of the envelope's thermostats, by site (they carry a seq):
    curl -sG {url}/query --data-urlencode db={db} \\
      --data-urlencode 'q=SELECT count("seq") FROM "thermostat" WHERE time > now() - 10m
        GROUP BY "site"'
  Rejected readings by reason:
    curl -sG {url}/query --data-urlencode db={db} \\
      --data-urlencode 'q=SELECT count("bytes") FROM "rejected" GROUP BY "reason"'
  The registry:            .venv/bin/iotgw devices list --site oak-street
  The onboarded sensor:    .venv/bin/iotgw devices show {onboarded}
  Devices awaiting approval (the fleet's unknown_device fault among them):
                           .venv/bin/iotgw devices pending
  Live services:           .venv/bin/iotgw run all   (metrics on :9108, :9109, :9110)
  Grafana dashboards:      compose/grafana/ (fleet overview, device detail, alerts);
                           Grafana runs in the Docker Compose deployment.
  The stack keeps running; stop it with: make stack-down""",
        highlight=False,
        soft_wrap=True,
    )


async def demo(devices: int, duration: float, rate: float) -> int:
    settings = load_settings()
    await ensure_topics(settings)
    logs = DEFAULT_STACK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    say(f"starting the bridge, the writer and the rules engine (log: {logs / 'demo-services.log'})")
    services, figures = await start_services(settings, logs / "demo-services.log")
    sent_log = DEFAULT_STACK_DIR / "demo-readings.jsonl"
    started_ms = now_ms()
    start = time.time()
    onboarding = Onboarding(
        settings, started_ms, joins_at=start + duration / 3, approve_at=start + duration * 2 / 3
    )
    onboarded = asyncio.create_task(onboarding.run(), name="onboarding")
    try:
        say(
            f"a home of {devices} devices (Zigbee2MQTT sensors, Tasmota and Shelly plugs and "
            f"sensors, envelope devices; bridge sources: {DEMO_SOURCES.name}), "
            f"{rate:g} readings/s for {duration:g} s, faults: {DEMO_FAULTS}; a third of the "
            "way in, a new Zigbee sensor"
        )
        stats = await run_simulation(
            settings, devices=devices, rate=rate, duration=duration, qos=1,
            faults=parse_faults(DEMO_FAULTS, "mixed"), register=True, log=sent_log, seed=1,
            extra=lambda: [*figures.rows(), *onboarding.rows()], fleet_format="mixed",
            newcomers=[onboarding.device],
        )  # fmt: skip
        # Its devices said offline as it stopped: their `offline` alerts fire after this.
        played_until_ms = now_ms()
        await onboarded
        say("auditing: every valid reading must be in iot.readings, and in InfluxDB")
        sent = SendLog.read(sent_log)
        report = await audit_until_settled(settings, sent, 60)
        new_device = onboarding.device.device_id
        newcomer = await audit(
            settings, SendLog([e for e in sent.entries if e["device_id"] == new_device])
        )
        summary = Table("", "", title="iotgw demo", show_header=False)
        summary.add_row("readings sent", f"{stats.readings} in {stats.seconds:.0f} s")
        for fmt, count in sorted(stats.formats.items()):
            summary.add_row(f"  as {fmt}", str(count))
        for label, value in figures.rows():
            summary.add_row(label, value.split(" (")[0])
        console.print(summary)
        console.print(audit_table(report))
        console.print(onboarding.table(newcomer))
        console.print(await alerts_table(settings, started_ms, played_until_ms))
    finally:
        onboarded.cancel()
        services.stop()
    next_steps(settings, new_device)
    return 1 if report.lost else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=100.0, help="readings/s, whole fleet")
    args = parser.parse_args()
    try:
        sys.exit(asyncio.run(demo(args.devices, args.duration, args.rate)))
    except IotgwError as exc:
        print_error(str(exc))
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
