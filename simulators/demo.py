"""`make demo`: a smart-home fleet through the whole pipeline, with live figures and an audit.

    python -m simulators.demo --devices 50 --duration 60

Expects the local stack (`iotgw stack up`). Registers the fleet, a home of Zigbee2MQTT
sensors, Tasmota and Shelly plugs and sensors and our own envelope devices; runs the
bridge (reading the sources of demo-sources.yaml) and the writer (`iotgw run all`) as a
child process, plays the fleet with a few faults, audits that nothing valid was lost,
prints what to look at next, and stops the services. The stack keeps running (stop it
with `make stack-down`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from simulators.audit import SendLog, audit_until_settled, read_since
from simulators.fleet import DEMO_FAULTS, parse_faults
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
    bridge, writer, _ = services.urls
    return services, ServiceFigures(f"{bridge}/metrics", f"{writer}/metrics")


async def alerts_table(settings: Settings, since_ms: int) -> Table:
    """The alerts of this run by rule and state (committed records of iot.alerts)."""
    records = await read_since(
        settings, Topics(settings.topic_prefix).alerts, since_ms, committed_only=True
    )
    counts = Counter(
        (alert["rule"], alert["state"]) for alert in (json.loads(r.value) for r in records)
    )
    table = Table("rule", "firing", "resolved", title="alerts (iot.alerts)")
    for rule in sorted({rule for rule, _ in counts}):
        table.add_row(rule, str(counts[(rule, "firing")]), str(counts[(rule, "resolved")]))
    return table


def next_steps(settings: Settings) -> None:
    url = str(settings.influx_url).rstrip("/")
    db = settings.influx_db
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
    try:
        say(
            f"a home of {devices} devices (Zigbee2MQTT sensors, Tasmota and Shelly plugs and "
            f"sensors, envelope devices; bridge sources: {DEMO_SOURCES.name}), "
            f"{rate:g} readings/s for {duration:g} s, faults: {DEMO_FAULTS}"
        )
        stats = await run_simulation(
            settings, devices=devices, rate=rate, duration=duration, qos=1,
            faults=parse_faults(DEMO_FAULTS, "mixed"), register=True, log=sent_log, seed=1,
            extra=figures.rows, fleet_format="mixed",
        )  # fmt: skip
        say("auditing: every valid reading must be in iot.readings, and in InfluxDB")
        report = await audit_until_settled(settings, SendLog.read(sent_log), 60)
        summary = Table("", "", title="iotgw demo", show_header=False)
        summary.add_row("readings sent", f"{stats.readings} in {stats.seconds:.0f} s")
        for fmt, count in sorted(stats.formats.items()):
            summary.add_row(f"  as {fmt}", str(count))
        for label, value in figures.rows():
            summary.add_row(label, value.split(" (")[0])
        console.print(summary)
        console.print(audit_table(report))
        console.print(await alerts_table(settings, started_ms))
    finally:
        services.stop()
    next_steps(settings)
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
