"""A smoke run of the benchmark harness with tiny counts: every run, every field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import Settings
from simulators.bench import DEFAULT_RUNS

pytestmark = pytest.mark.integration


# The session's InfluxDB 2.7, which the bench finds running and leaves so.
@pytest.mark.usefixtures("influxdb2_stack")
def test_bench_smoke_run_reports_every_run_and_field(settings: Settings, tmp_path: Path) -> None:
    """`iotgw bench` with tiny counts writes latest.json with the ceilings, its default runs
    (Telegraf, built on first use, iotgw with one and two workers), the writer into
    InfluxDB 1.6.7 and 2.7 (each with its ceiling; on 2.7 influxdb-client's two ways too),
    the rules engine and the aims, a chart, and with --profile where iotgw's drain spent
    its time."""
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--readings", "300", "--live", "200",
         "--rates", "100,200", "--seconds", "1", "--out", str(tmp_path), "--profile"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "IOTGW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    assert {"cpus", "cpu_model", "memory_gib", "kafka", "python"} <= set(results["machine"])
    assert [run["name"] for run in results["runs"]] == list(DEFAULT_RUNS)
    for run in results["runs"]:
        for key in ("readings_per_s", "p50_ms", "p99_ms", "cpu_s_per_10k", "rss_mb", "lost"):
            assert key in run, (run["name"], key)
        assert run["drain"]["finished"], run["name"]
        assert run["readings_per_s"] > 0
        assert run["lost"] == 0, run["name"]
        assert set(run["latency"]) == {"100", "200"}
        # py-spy samples iotgw's drain (its stacks beside the results), not Telegraf's.
        assert ("profile" in run) == run["name"].startswith("iotgw"), run["name"]
    assert (tmp_path / "profile-iotgw_1.txt").exists()
    assert [c["name"] for c in results["ceilings"]] == ["mosquitto_sub", "kafka_producer_perf"]
    assert all(c["readings_per_s"] > 0 for c in results["ceilings"])
    writer, writer2, rules = results["writer"], results["writer_influxdb2"], results["rules"]
    assert writer["influxdb"].startswith("1.6.7")
    assert writer2["influxdb"].startswith("2.7.")
    for run in (writer, writer2):
        assert run["points"] == 300
        assert run["points_per_s"] > 0
        assert run["ceiling_points_per_s"] > 0
    assert writer2["client_points_per_s"] > 0
    assert writer2["client_line_protocol_per_s"] > 0
    assert rules["readings"] == 300
    assert rules["rules"] == 100
    assert rules["readings_per_s"] > 0
    assert len(results["aims"]) == 6
    assert (tmp_path / "latest.png").stat().st_size > 10_000
    assert "iotgw bench" in result.stdout
    assert "aims" in result.stdout
