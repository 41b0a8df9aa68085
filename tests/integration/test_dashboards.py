"""Grafana dashboards: well formed, on the provisioned datasource, and every query returns
rows from a real InfluxDB that holds simulated readings, alerts and dead letters."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.adapters.kafka import create_producer, produce
from gateway.clock import now_ms
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from tests.conftest import unique
from tests.support import (
    canonical,
    influx_rows,
    own_settings,
    register,
    running_writer,
    until_points,
)

pytestmark = pytest.mark.integration

GRAFANA = Path(__file__).resolve().parents[2] / "compose" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
LOADED = {path.stem: json.loads(path.read_text()) for path in DASHBOARDS}

FULL_METRICS: dict[str, dict[str, Any]] = {
    "thermostat": {
        "temperature_c": 21.5,
        "humidity_pct": 40.0,
        "setpoint_c": 21.0,
        "heating": True,
    },
    "air_quality": {
        "co2_ppm": 650.0,
        "pm2_5_ugm3": 8.0,
        "voc_index": 100.0,
        "temperature_c": 22.0,
        "humidity_pct": 45.0,
    },
    "motion": {"motion": True, "lux": 300.0, "battery_pct": 90.0},
    "contact": {"open": False, "battery_pct": 80.0},
    "smart_plug": {
        "on": True,
        "power_w": 1200.0,
        "voltage_v": 230.0,
        "current_a": 5.2,
        "energy_kwh": 12.5,
    },
}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel["type"] != "row":
            found.append(panel)
    return found


def test_dashboards_are_well_formed_and_use_the_provisioned_datasource() -> None:
    """Unique uids; every panel and target names the datasource Grafana is provisioned with."""
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/influxdb.yaml").read_text())
    [datasource] = provisioned["datasources"]
    assert datasource["jsonData"]["version"] == "InfluxQL"
    dashboards = list(LOADED.values())
    assert {d["title"] for d in dashboards} >= {
        "iotgw fleet overview", "iotgw device detail", "iotgw alerts",
    }  # fmt: skip
    uids = [d["uid"] for d in dashboards]
    assert len(uids) == len(set(uids))
    for dashboard in dashboards:
        panel_ids = [p["id"] for p in dashboard["panels"]]
        assert len(panel_ids) == len(set(panel_ids)), dashboard["uid"]
        for panel in panels(dashboard):
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == datasource["uid"]
                assert target["rawQuery"] is True


def test_device_detail_has_a_panel_per_metric_of_every_type() -> None:
    """One panel for each metric of DESIGN.md's device types."""
    device = LOADED["device-detail"]
    titles = {p["title"] for p in panels(device)}
    expected = {f"{t}: {m}" for t, metrics in FULL_METRICS.items() for m in metrics}
    assert titles == expected
    assert [v["name"] for v in device["templating"]["list"]] == ["device"]


async def simulated(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """A database filled through the real writer: a device of every type, alerts, dead letters."""
    s = await own_settings(settings, writer_flush_interval_s=0.2)
    devices = {t: unique(t.replace("_", "-")) for t in FULL_METRICS}
    await register(
        s,
        *(
            Device(device_id=d, type=DeviceType(t), registered_at=0, site="home", room="hall")
            for t, d in devices.items()
        ),
    )
    topics = Topics(s.topic_prefix)
    t0 = now_ms() - 20 * 60_000
    readings = [
        (d.encode(), canonical(d, t, i, t0 + i * 60_000, **FULL_METRICS[t]))
        for t, d in devices.items()
        for i in range(15)
    ]
    await produce(s, topics.readings, readings)
    contact = devices["contact"]
    alert = {"rule": "door-left-open", "device_id": contact, "state": "firing", "value": True,
             "ts": t0, "message": "open for 10m"}  # fmt: skip
    await produce(s, topics.alerts, [(contact.encode(), json.dumps(alert).encode())])
    producer_headers = [("error", b"schema"), ("detail", b"bad"), ("received_at", str(t0).encode())]
    producer = create_producer(s)
    await producer.start()
    try:
        await producer.send_and_wait(
            topics.dead_letters, b"{}", key=contact.encode(), headers=producer_headers
        )
    finally:
        await producer.stop()
    async with running_writer(s):
        for t in FULL_METRICS:
            await until_points(s, t, 15)
        await until_points(s, "alerts", 1, field="message")
        await until_points(s, "rejected", 1, field="bytes")
        await until_points(s, "iotgw_writer", 1, field="lag")
    return s, devices


def substitute(query: str, device: str) -> str:
    """What Grafana does before sending a query: variables and time macros."""
    return (
        query.replace("$timeFilter", "time > now() - 1h")
        .replace("$__interval", "1m")
        .replace("$device", re.escape(device))
    )


async def test_every_panel_query_returns_rows(settings: Settings) -> None:
    """Each panel's InfluxQL, with variables substituted, returns rows from real data."""
    own, devices = await simulated(settings)
    checked = 0
    for name, dashboard in LOADED.items():
        for panel in panels(dashboard):
            for target in panel["targets"]:
                measurement = re.search(r'FROM "(\w+)"', target["query"])
                device = devices.get(measurement.group(1), "none") if measurement else "none"
                rows = await influx_rows(own, substitute(target["query"], device))
                assert rows, f"{name}: {panel['title']} returned nothing"
                checked += 1
    assert checked >= 25
