"""A short simulation through the real bridge and writer, its audit, and `make demo`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings
from simulators.audit import SendLog, audit_until_settled
from simulators.fleet import FAULTS, parse_faults
from simulators.runner import run_simulation
from tests.conftest import unique
from tests.support import (
    forget_session,
    own_settings,
    running_bridge,
    running_writer,
    service_env,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALL_FAULTS = ",".join(f"{kind}=0.01" for kind in FAULTS if kind != "offline")


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
    """`make demo` with a short duration: registers, streams, audits, exits 0 with lost 0."""
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
    lost_line = next(line for line in result.stdout.splitlines() if "│ lost" in line)
    assert lost_line.split("│")[2].strip() == "0"
    assert "What to look at next" in result.stdout
