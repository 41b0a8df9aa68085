"""A user-defined device type end to end: types.yaml, its JSON Schema, the simulator, the
bridge, InfluxDB and the device-detail dashboard's query."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema
import pytest

from gateway.settings import Settings
from schemas.generate import reading_schema
from simulators.audit import SendLog, audit_until_settled
from simulators.fleet import FleetTraffic, build_fleet
from simulators.runner import run_simulation
from tests.integration.test_dashboards import generic_queries, substitute, type_variable
from tests.support import (
    SOIL_PROBE_TYPES,
    forget_session,
    influx_rows,
    own_settings,
    running_bridge,
    running_writer,
)

pytestmark = pytest.mark.integration


async def test_a_user_type_from_types_yaml_to_the_dashboard(
    settings: Settings, tmp_path: Path
) -> None:
    """types.yaml defines soil_probe; its JSON Schema takes what the simulator sends and
    refuses an out-of-range value; the simulator plays it through the bridge and the writer
    with nothing lost; the dashboard's generic panels return its rows from InfluxDB."""
    types_file = tmp_path / "types.yaml"
    types_file.write_text(SOIL_PROBE_TYPES)
    s = await own_settings(settings, writer_flush_interval_s=0.2, types_file=types_file)
    catalogue = s.catalogue()

    schema = reading_schema(catalogue)
    traffic = FleetTraffic(build_fleet(3, 5, types=["soil_probe"], catalogue=catalogue), {}, 5)
    now = time.time()
    payloads = [
        json.loads(message.payload)
        for step in range(20)
        for device in traffic.devices
        for message in traffic.messages(device, now + step * 10)
    ]
    assert payloads
    for payload in payloads:
        jsonschema.validate(payload, schema)
        assert payload["type"] == "soil_probe"
        assert set(payload["metrics"]) == {"moisture_pct", "temperature_c", "leak", "tips"}
    wrong = {**payloads[0], "metrics": {"moisture_pct": 101}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, schema)

    log = tmp_path / "sent.jsonl"
    try:
        async with running_bridge(s), running_writer(s):
            await run_simulation(
                s, devices=4, rate=40, duration=4, qos=1, faults={}, register=True, log=log,
                seed=9, types=["soil_probe"],
            )  # fmt: skip
            report = await audit_until_settled(s, SendLog.read(log), 60)
    finally:
        await forget_session(s)
    assert report.lost == 0, report.lost_examples
    assert report.in_influx == report.valid_sent == report.sent > 100
    device = SendLog.read(log).entries[0]["device_id"]
    assert await type_variable(s, device) == ["soil_probe"]
    for title, query in generic_queries().items():
        rows = await influx_rows(s, substitute(query, device, "soil_probe"))
        assert [row for row in rows if any(v is not None for v in row[1:])], title
