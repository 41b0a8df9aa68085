"""A short simulation through the real bridge and writer, its audit (for a fleet of our
envelope, and for a mixed fleet of Zigbee2MQTT, Tasmota, Shelly and envelope devices), and
`make demo`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings
from gateway.topics import Topics
from simulators.audit import SendLog, audit_until_settled, read_since, reading_key
from simulators.fleet import ENVELOPE_ONLY_FAULTS, FAULTS, parse_faults
from simulators.formats import Format
from simulators.runner import run_simulation
from tests.conftest import unique
from tests.support import (
    forget_session,
    mixed_home_settings,
    own_settings,
    running_bridge,
    running_writer,
    service_env,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALL_FAULTS = ",".join(f"{kind}=0.01" for kind in FAULTS if kind != "offline")
# Every fault a device of any format can make.
SOURCE_FAULTS = ",".join(
    f"{kind}=0.01" for kind in FAULTS if kind != "offline" and kind not in ENVELOPE_ONLY_FAULTS
)


async def test_simulate_then_audit_finds_nothing_lost(settings: Settings, tmp_path: Path) -> None:
    """Every fault switched on: the audit accounts for every reading, loses none, and each
    dead-letter reason matches the faults sent."""
    s = await own_settings(settings, writer_flush_interval_s=0.2)
    log = tmp_path / "sent.jsonl"
    try:
        async with running_bridge(s), running_writer(s):
            stats = await run_simulation(
                s, devices=30, rate=300, duration=6, qos=1, faults=parse_faults(ALL_FAULTS),
                register=True, log=log, seed=11,
            )  # fmt: skip
            report = await audit_until_settled(s, SendLog.read(log), 60)
    finally:
        await forget_session(s)
    assert stats.readings == report.sent > 1500
    assert report.lost == 0
    assert report.in_kafka == report.valid_sent
    assert report.in_influx == report.valid_sent
    assert report.duplicates == report.duplicates_sent
    rejected = dict(report.rejected)
    rejected.pop("rate_limited", None)  # bursts may go over a device's limit: not a fault's
    assert rejected == report.expected_rejected
    assert set(report.expected_rejected) == {
        "malformed", "schema", "unknown_device", "clock_skew", "too_large",
    }  # fmt: skip


async def test_mixed_fleet_through_the_bridge_audits_nothing_lost(
    settings: Settings, tmp_path: Path
) -> None:
    """A home of Zigbee2MQTT, Tasmota, Shelly and envelope devices, every fault of those
    formats switched on, through the live bridge reading its sources file and the writer:
    the audit finds every valid reading in iot.readings and once in InfluxDB, loses none,
    and the dead-letter reasons match the faults sent; the readings of the source formats
    carry their device's time (`ts_source: device`)."""
    s, base_topic = await mixed_home_settings(settings, tmp_path)
    log = tmp_path / "sent.jsonl"
    try:
        async with running_bridge(s), running_writer(s):
            stats = await run_simulation(
                s, devices=30, rate=300, duration=8, qos=1,
                faults=parse_faults(SOURCE_FAULTS, "mixed"), register=True, log=log, seed=17,
                fleet_format="mixed", base_topic=base_topic,
            )  # fmt: skip
            report = await audit_until_settled(s, SendLog.read(log), 60)
    finally:
        await forget_session(s)
    assert set(stats.formats) == {f.value for f in Format}
    assert stats.formats[Format.TASMOTA] > 30  # one a second a device at most
    assert stats.readings == report.sent > 1000
    assert report.lost == 0, report.lost_examples
    assert report.in_kafka == report.valid_sent
    assert report.in_influx == report.valid_sent
    assert report.duplicates_in_influx == 0
    assert report.duplicates == report.duplicates_sent
    rejected = dict(report.rejected)
    rejected.pop("rate_limited", None)  # bursts may go over a device's limit: not a fault's
    assert rejected == report.expected_rejected
    assert set(report.expected_rejected) == {
        "malformed", "schema", "unknown_device", "clock_skew", "too_large",
    }  # fmt: skip
    sent = SendLog.read(log)
    by_time = {e["device_id"] for e in sent.entries if e["format"] != Format.ENVELOPE}
    records = await read_since(s, Topics(s.topic_prefix).readings, sent.window_ms[0] - 60_000)
    sources_seen = {}
    for record in records:
        key = reading_key(record.value)
        if key is not None and key[0] in by_time:
            sources_seen[key] = dict(record.headers).get("ts_source")
    assert len(sources_seen) == len({k for k in sent.valid if k[1] == "ts"})
    assert set(sources_seen.values()) == {b"device"}


def test_audit_command_exits_1_when_a_valid_reading_is_missing(
    settings: Settings, tmp_path: Path
) -> None:
    """A reading in the log that is in neither topic is lost: exit 1, and --json says so."""
    log = tmp_path / "sent.jsonl"
    ghost = unique("never-sent")
    log.write_text(
        json.dumps({"device_id": ghost, "seq": 1, "ts": 1795680000000, "fault": None}) + "\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "--log", str(log), "--json"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "IOTGW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert {k: report[k] for k in ("sent", "valid_sent", "in_kafka", "in_dlq", "lost")} == {
        "sent": 1, "valid_sent": 1, "in_kafka": 0, "in_dlq": 0, "lost": 1,
    }  # fmt: skip
    assert {"in_influx", "duplicates"} <= set(report)


def test_make_demo_runs_end_to_end(settings: Settings) -> None:
    """`make demo` with a short duration: registers, streams, onboards a sensor paired
    mid-run (pending, approved, its held readings replayed), audits, exits 0 with lost 0."""
    s = asyncio.run(own_settings(settings))
    try:
        result = subprocess.run(
            ["make", "demo", "DEMO_DURATION=6"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env=service_env(s),
        )  # fmt: skip
    finally:
        asyncio.run(forget_session(s))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "registered 50 devices" in result.stdout
    assert {f"as {f.value}" for f in Format} <= set(re.findall(r"as \w+", result.stdout))
    approved = re.search(
        r"approved (\S+): (\d+) held readings replayed into iot.readings", result.stdout
    )
    assert approved is not None, result.stdout[-3000:]
    sensor, replayed = approved[1], int(approved[2])
    assert replayed > 0
    lines = result.stdout.splitlines()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines]
    assert [sensor, "zigbee2mqtt", "climate"] in [row[:3] for row in cells]  # listed as pending
    title = next(i for i, line in enumerate(lines) if line.strip() == "onboarding")
    end = next(i for i in range(title, len(lines)) if lines[i].startswith("└"))
    onboarding = {row[0]: row[1] for row in cells[title:end] if len(row) == 2}
    assert onboarding["new device"] == sensor
    assert onboarding["held, replayed on approval"] == str(replayed)
    valid = re.fullmatch(r"(\d+) of (\d+)", onboarding["valid readings in iot.readings"])
    assert valid is not None
    assert valid[1] == valid[2]
    assert int(valid[1]) >= replayed
    # The whole fleet's audit, then the sensor's own: nothing lost in either.
    assert [row[1] for row in cells if row[:1] == ["lost"]] == ["0", "0"]
    assert "What to look at next" in result.stdout
