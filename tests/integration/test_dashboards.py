"""Grafana dashboards: well formed, on the provisioned datasource, and every query returns
rows from a real InfluxDB that holds simulated readings (of every built-in type and a
user-defined one), availability, alerts, dead letters and hourly rollups; over long ranges
the device panels read the rollups beyond the raw retention."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import create_producer, produce
from gateway.clock import now_ms
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.records import AvailabilityRecord
from gateway.domain.rollups import (
    DAY_S,
    HOUR_S,
    RAW_RETENTION_S,
    ROLLUP_RETENTION_POLICY,
    influxql_duration,
)
from gateway.domain.validation import Accepted, ReadingValidator
from gateway.settings import Settings
from gateway.topics import Topics, telemetry_topic
from schemas import Device
from schemas.types import BUILTIN_CATALOGUE
from tests.conftest import unique
from tests.support import (
    SOIL_PROBE_TYPES,
    canonical,
    influx_rows,
    own_settings,
    register,
    running_writer,
    set_up,
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
    "climate": {
        "temperature_c": 19.5,
        "humidity_pct": 55.0,
        "pressure_hpa": 1013.2,
        "battery_pct": 70.0,
    },
}
# A user-defined type (DESIGN.md, "Device sources"): the dashboard has no panel of its own
# for it, only the generic ones of the device's `$type`.
USER_TYPES = SOIL_PROBE_TYPES
USER_METRICS: dict[str, dict[str, Any]] = {
    "soil_probe": {"moisture_pct": 41.5, "temperature_c": 12.5, "leak": False, "tips": 3},
}


HOUR_MS, DAY_MS = HOUR_S * 1000, DAY_S * 1000
# A long time range as Grafana asks for it: about a thousand buckets.
NINETY_DAYS: dict[str, Any] = {"time_range": "90d", "interval_s": 3 * HOUR_S}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel["type"] != "row":
            found.append(panel)
    return found


def reads_rollup(query: str) -> bool:
    """True for a query of the hourly rollups (retention policy, or mapped bucket, rollup)."""
    return f'FROM "{ROLLUP_RETENTION_POLICY}".' in query


def raw_retention() -> str:
    """The device-detail dashboard's `$raw_retention`, a constant."""
    [variable] = [
        v for v in LOADED["device-detail"]["templating"]["list"] if v["name"] == "raw_retention"
    ]
    assert variable["type"] == "constant"
    return str(variable["query"])


def expected_titles() -> set[str]:
    """The device-detail panels of the built-in types' metrics, one each."""
    return {f"{t}: {m}" for t, metrics in FULL_METRICS.items() for m in metrics}


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
    """One panel for each metric of the built-in types, and the generic panels of `$type`."""
    assert {t: list(m) for t, m in FULL_METRICS.items()} == {
        spec.name: [m.name for m in spec.metrics] for spec in BUILTIN_CATALOGUE.types.values()
    }
    device = LOADED["device-detail"]
    titles = {p["title"] for p in panels(device)}
    assert titles == expected_titles() | {
        "$type: every number",
        "$type: latest",
        "online / offline",
    }
    assert [v["name"] for v in device["templating"]["list"]] == ["device", "type", "raw_retention"]


def test_device_panels_over_time_read_the_rollups_beyond_the_raw_retention() -> None:
    """Every panel of a device's readings over time has a second query, of the rollups, for
    the part of the range older than `$raw_retention`, which is iotgw's raw retention."""
    assert raw_retention() == influxql_duration(RAW_RETENTION_S)
    over_time = [
        panel
        for panel in panels(LOADED["device-detail"])
        if panel["type"] in ("timeseries", "state-timeline")
        and panel["title"] != "online / offline"
    ]
    assert len(over_time) == len(expected_titles()) + 1
    for panel in over_time:
        [raw] = [t["query"] for t in panel["targets"] if not reads_rollup(t["query"])]
        [rollup] = [t["query"] for t in panel["targets"] if reads_rollup(t["query"])]
        assert "$timeFilter AND time < now() - $raw_retention" in rollup, panel["title"]
        assert "$raw_retention" not in raw, panel["title"]


@pytest.fixture
def types_file(tmp_path: Path) -> Path:
    """A types file that defines USER_TYPES."""
    path = tmp_path / "types.yaml"
    path.write_text(USER_TYPES)
    return path


async def simulated(settings: Settings, types_file: Path) -> tuple[Settings, dict[str, str]]:
    """A database filled through the real writer: a device of every type, built-in or of the
    types file, availability (the contact sensor offline, the others online), alerts, dead
    letters."""
    s = await own_settings(settings, writer_flush_interval_s=0.2, types_file=types_file)
    every_type = FULL_METRICS | USER_METRICS
    devices = {t: unique(t.replace("_", "-")) for t in every_type}
    await register(
        s,
        *(
            Device(device_id=d, type=t, registered_at=0, site="home", room="hall")
            for t, d in devices.items()
        ),
    )
    topics = Topics(s.topic_prefix)
    t0 = now_ms() - 20 * 60_000
    catalogue = s.catalogue()
    for t, metrics in every_type.items():
        catalogue.metrics_adapter(t).validate_python(metrics)
    readings = [
        (d.encode(), canonical(d, t, i, t0 + i * 60_000, **every_type[t]))
        for t, d in devices.items()
        for i in range(15)
    ]
    await produce(s, topics.readings, readings)
    contact = devices["contact"]
    await produce(s, topics.availability, [
        availability_record(d, d != contact, t0 + 1000) for d in devices.values()
    ])  # fmt: skip
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
        for t in every_type:
            await until_points(s, t, 15)
        await until_points(s, "alerts", 1, field="message")
        await until_points(s, "rejected", 1, field="bytes")
        await until_points(s, "iotgw_writer", 1, field="lag")
        await until_points(s, "availability", len(devices), field="online")
    return s, devices


def availability_record(device_id: str, online: bool, ts: int) -> tuple[bytes, bytes]:
    """A record of iot.availability as the bridge writes it."""
    record = AvailabilityRecord(device_id=device_id, online=online, ts=ts, source="envelope")
    return device_id.encode(), json.dumps(record).encode()


def substitute(
    query: str,
    device: str,
    device_type: str = "none",
    *,
    time_range: str = "1h",
    interval_s: int = 60,
) -> str:
    """What Grafana does before sending a query: variables and time macros, for the last
    `time_range` in buckets of `interval_s`."""
    return (
        query.replace("$timeFilter", f"time > now() - {time_range}")
        .replace("$__interval_ms", str(interval_s * 1000))
        .replace("$__interval", f"{interval_s}s")
        .replace("$raw_retention", raw_retention())
        .replace("$device", re.escape(device))
        .replace("$type", re.escape(device_type))
    )


async def type_variable(settings: Settings, device: str) -> list[str]:
    """The values Grafana offers for the device-detail dashboard's `$type` once `$device` is
    chosen: its query's answer, kept by its regex (a JavaScript one, written /.../)."""
    [variable] = [v for v in LOADED["device-detail"]["templating"]["list"] if v["name"] == "type"]
    keep = re.compile(variable["regex"][1 : variable["regex"].rindex("/")])
    answer = await influx_rows(settings, substitute(variable["query"], device))
    return [str(row[0]) for row in answer if keep.search(str(row[0]))]


def rollup_line(device_type: str, device: str, metrics: dict[str, Any], ts: int) -> str:
    """The hourly rollup of one reading of `metrics`, as InfluxDB's continuous query or task
    writes it: per number its mean, min, max and count, per boolean its count and trues."""
    fields = []
    for metric, value in metrics.items():
        if isinstance(value, bool):
            fields += [f"{metric}_count=1i", f"{metric}_true={int(value)}i"]
        else:
            typed = f"{value}i" if isinstance(value, int) else f"{value}"
            fields += [f"{metric}_mean={float(value)}", f"{metric}_min={typed}",
                       f"{metric}_max={typed}", f"{metric}_count=1i"]  # fmt: skip
    return f"{device_type},device_id={device},site=home,room=hall {','.join(fields)} {ts}"


async def write_rollups(settings: Settings, lines: list[str]) -> None:
    """Write rollup points where InfluxDB's own rollups go: retention policy `rollup` of the
    database (on 2.x, through its DBRP mapping, the rollup bucket)."""
    token = settings.influx_token
    headers = {"Authorization": f"Token {token.get_secret_value()}"} if token else {}
    async with httpx.AsyncClient(
        base_url=str(settings.influx_url), auth=settings.influx_auth, headers=headers
    ) as http:
        response = await http.post(
            "/write",
            params={
                "db": settings.influx_database,
                "rp": ROLLUP_RETENTION_POLICY,
                "precision": "ms",
            },
            content="\n".join(lines).encode(),
        )
    assert response.status_code == 204, response.text


async def test_every_panel_query_returns_rows(settings: Settings, types_file: Path) -> None:
    """Each panel's InfluxQL returns rows from real data (its rollup queries from rollups two
    months old); `$type`'s for a device of every type."""
    own, devices = await simulated(settings, types_file)
    # The device whose points a query of a measurement without a device type shows.
    shown = {**devices, "availability": devices["contact"]}
    every_type = FULL_METRICS | USER_METRICS
    two_months_ago = (now_ms() - 60 * DAY_MS) // HOUR_MS * HOUR_MS
    checked = 0
    async with set_up(own):
        await write_rollups(own, [
            rollup_line(t, d, every_type[t], two_months_ago) for t, d in devices.items()
        ])  # fmt: skip
        for name, dashboard in LOADED.items():
            for panel in panels(dashboard):
                for target in panel["targets"]:
                    query = target["query"]
                    if "$type" in query:
                        for device_type, device in devices.items():
                            assert await type_variable(own, device) == [device_type]
                            rows = await influx_rows(
                                own, substitute(query, device, device_type, **NINETY_DAYS)
                            )
                            assert rows, f"{name}: {panel['title']} showed nothing of {device_type}"
                            checked += 1
                        continue
                    measurement = re.search(r'FROM (?:"rollup"\.)?"(\w+)"', query)
                    device = shown.get(measurement.group(1), "none") if measurement else "none"
                    rows = await influx_rows(own, substitute(query, device, **NINETY_DAYS))
                    assert rows, f"{name}: {panel['title']} returned nothing"
                    checked += 1
    assert checked >= 70


def generic_queries() -> dict[str, str]:
    """The device-detail dashboard's panels that show whatever type the device has: their
    query of the raw readings."""
    return {
        panel["title"]: target["query"]
        for panel in panels(LOADED["device-detail"])
        for target in panel["targets"]
        if "$type" in target["query"] and not reads_rollup(target["query"])
    }


async def test_generic_panels_show_every_metric_of_a_user_defined_type(
    settings: Settings, types_file: Path
) -> None:
    """A types-file type's readings show in the `$type` panels: numbers, latest values, no seq."""
    own = await own_settings(settings, writer_flush_interval_s=0.2, types_file=types_file)
    device = unique("soil")
    await register(own, Device(device_id=device, type="soil_probe", registered_at=0, site="home"))
    validator = ReadingValidator(
        {device: Device(device_id=device, type="soil_probe", registered_at=0)}.get,
        require_registration=True,
        max_age_ms=3600_000,
        limiter=RateLimiter(1000.0, 1000),
        catalogue=own.catalogue(),
    )
    t0 = now_ms() - 10 * 60_000
    sent = [
        {"moisture_pct": 40, "temperature_c": 12.0, "leak": False, "tips": 0},
        {"moisture_pct": 42.5, "leak": True, "tips": 2},  # a partial reading
        {"moisture_pct": 45.5, "temperature_c": 13.0, "leak": False, "tips": 5},
    ]
    payloads = [
        json.dumps({"type": "soil_probe", "ts": t0 + i * 120_000, "seq": i, "metrics": m})
        for i, m in enumerate(sent)
    ]
    outcomes = [
        outcome
        for payload in payloads
        for outcome in validator.process(telemetry_topic(device), payload.encode(), now_ms())
    ]
    accepted = [o for o in outcomes if isinstance(o, Accepted)]
    assert len(accepted) == len(sent), outcomes
    topics = Topics(own.topic_prefix)
    await produce(own, topics.readings, [(o.device_id.encode(), o.value) for o in accepted])
    # The device's own alerts and dead letters share its tag: `$type` must not offer them.
    alert = {"rule": "soil-dry", "device_id": device, "state": "firing", "value": 40.0,
             "ts": t0, "message": "dry"}  # fmt: skip
    await produce(own, topics.alerts, [(device.encode(), json.dumps(alert).encode())])
    headers = [("error", b"schema"), ("detail", b"bad"), ("received_at", str(t0).encode())]
    producer = create_producer(own)
    await producer.start()
    try:
        await producer.send_and_wait(
            topics.dead_letters, b"{}", key=device.encode(), headers=headers
        )
    finally:
        await producer.stop()
    async with running_writer(own):
        await until_points(own, "soil_probe", len(sent))
        await until_points(own, "alerts", 1, field="message")
        await until_points(own, "rejected", 1, field="bytes")

    assert await type_variable(own, device) == ["soil_probe"]
    queries = generic_queries()
    async with InfluxClient(str(own.influx_url), auth=own.influx_auth) as influx:
        [every_number] = await influx.query(
            substitute(queries["$type: every number"], device, "soil_probe"), db=own.influx_db
        )
        [latest] = await influx.query(
            substitute(queries["$type: latest"], device, "soil_probe"), db=own.influx_db
        )
    [series] = every_number["series"]
    assert series["name"] == "soil_probe"
    assert series["columns"] == ["time", "mean_moisture_pct", "mean_temperature_c", "mean_tips"]
    points = [row for row in series["values"] if any(v is not None for v in row[1:])]
    assert [row[1:] for row in points] == [[40.0, 12.0, 0], [42.5, None, 2], [45.5, 13.0, 5]]
    [series] = latest["series"]
    assert series["columns"] == [
        "time", "last_leak", "last_moisture_pct", "last_temperature_c", "last_tips",
    ]  # fmt: skip
    assert series["values"][0][1:] == [False, 45.5, 13.0, 5]


def fleet_online_queries() -> list[str]:
    """The fleet overview's "Devices online per site" queries: online first, then offline."""
    [panel] = [
        p for p in panels(LOADED["fleet-overview"]) if p["title"] == "Devices online per site"
    ]
    return [target["query"] for target in panel["targets"]]


async def test_online_per_site_counts_each_devices_latest_availability(settings: Settings) -> None:
    """The fleet panel counts each device by what it said last (hours ago counts too), per
    site; the device panel shows one device's online/offline changes in the time range."""
    own = await own_settings(settings, writer_flush_interval_s=0.2)
    steady, gone, flapping, office = (unique(name) for name in ("steady", "gone", "flap", "office"))
    await register(own, *(
        Device(device_id=d, type="smart_plug", registered_at=0, site=site)
        for d, site in [(steady, "home"), (gone, "home"), (flapping, "home"), (office, "office")]
    ))  # fmt: skip
    hours_ago, minutes_ago = now_ms() - 3 * 3600_000, now_ms() - 30 * 60_000
    said = [(steady, True, hours_ago), (gone, True, hours_ago), (flapping, True, hours_ago),
            (office, True, hours_ago), (gone, False, hours_ago + 60_000),
            (flapping, False, minutes_ago), (flapping, True, minutes_ago + 600_000)]  # fmt: skip
    await produce(own, Topics(own.topic_prefix).availability, [
        availability_record(device, online, ts) for device, online, ts in said
    ])  # fmt: skip
    async with running_writer(own):
        await until_points(own, "availability", len(said), field="online")
    counts = []
    async with InfluxClient(str(own.influx_url), auth=own.influx_auth) as influx:
        for query in fleet_online_queries():
            [result] = await influx.query(substitute(query, "none"), db=own.influx_db)
            counts.append({s["tags"]["site"]: s["values"][0][1] for s in result["series"]})
    assert counts == [{"home": 2, "office": 1}, {"home": 1}]
    [timeline] = [p for p in panels(LOADED["device-detail"]) if p["title"] == "online / offline"]
    rows = await influx_rows(own, substitute(timeline["targets"][0]["query"], flapping))
    assert rows == [[minutes_ago, False], [minutes_ago + 600_000, True]]


async def device_panel(
    settings: Settings, title: str, device: str, device_type: str = "none", **macros: Any
) -> dict[str, list[list[Any]]]:
    """What a device-detail panel shows: its series, named as Grafana names them (the
    target's alias, `$col` the column), each with its points that have a value."""
    [panel] = [p for p in panels(LOADED["device-detail"]) if p["title"] == title]
    shown = {}
    async with InfluxClient.for_settings(settings) as influx:
        for target in panel["targets"]:
            query = substitute(target["query"], device, device_type, **macros)
            for result in await influx.query(query, db=settings.influx_database):
                for series in result.get("series", []):
                    for i, column in enumerate(series["columns"][1:], start=1):
                        points = [
                            [row[0], row[i]] for row in series["values"] if row[i] is not None
                        ]
                        shown[target["alias"].replace("$col", column)] = points
    return shown


async def test_a_long_range_shows_the_rollups_beyond_the_raw_retention(
    any_influx: Settings,
) -> None:
    """Over 120 days a thermostat's panels show the hourly rollups of 60 and 90 days ago and
    the raw readings of the last hour, each once: not the rollup of the recent hours too."""
    s = await own_settings(any_influx)
    device = unique("thermostat")
    now = now_ms()
    day90, day60 = ((now - days * DAY_MS) // HOUR_MS * HOUR_MS for days in (90, 60))
    recent = (now - 60_000) // HOUR_MS * HOUR_MS
    raw = [(recent, 21.5, True), (recent + 1000, 22.5, False)]
    rollups = [
        (day90, 16.0, 15.0, 17.0, 6, 6),
        (day60, 18.5, 17.0, 20.0, 6, 3),
        # The recent hour's rollup (until InfluxDB recomputes it from the raw readings).
        (recent, 99.0, 99.0, 99.0, 6, 0),
    ]
    tags = f"thermostat,device_id={device},site=home"
    async with set_up(s):
        await write_rollups(s, [
            f"{tags} temperature_c_mean={mean},temperature_c_min={low},temperature_c_max={high},"
            f"temperature_c_count={count}i,heating_count={count}i,heating_true={trues}i {ts}"
            for ts, mean, low, high, count, trues in rollups
        ])  # fmt: skip
        async with InfluxClient.for_settings(s) as influx:
            await influx.write(s.influx_database, "\n".join(
                f"{tags} temperature_c={value},heating={str(on).lower()},seq={i}i {ts}"
                for i, (ts, value, on) in enumerate(raw)
            ))  # fmt: skip
        long_range: dict[str, Any] = {"time_range": "120d", "interval_s": HOUR_S}
        temperature = await device_panel(s, "thermostat: temperature_c", device, **long_range)
        heating = await device_panel(s, "thermostat: heating", device, **long_range)
        every_number = await device_panel(
            s, "$type: every number", device, "thermostat", **long_range
        )
    assert temperature == {
        "temperature_c": [[recent, 22.0]],
        "temperature_c (hourly mean)": [[day90, 16.0], [day60, 18.5]],
    }
    assert heating == {
        "heating": [[recent, True], [recent + 1000, False]],
        "heating (share true per hour)": [[day90, 1.0], [day60, 0.5]],
    }
    assert every_number == {
        "mean_temperature_c": [[recent, 22.0]],
        "mean_temperature_c_mean (hourly)": [[day90, 16.0], [day60, 18.5]],
    }
