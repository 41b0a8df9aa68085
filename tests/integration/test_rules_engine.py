"""The rules engine end to end: MQTT readings through the bridge, alerts out of the
engine, MQTT commands, webhooks with retries, alerts in InfluxDB, and a kill -9."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.clock import now_ms
from gateway.services.rules import RulesService
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from simulators.processes import ServiceProcess
from tests.conftest import unique
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    register,
    running,
    running_bridge,
    running_writer,
    until,
    until_points,
)

pytestmark = pytest.mark.integration


class WebhookServer:
    """A local HTTP server that answers POSTs with scripted statuses and keeps the bodies."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[int, dict[str, Any]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = outer.statuses.pop(0) if outer.statuses else 200
                outer.requests.append((status, body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def delivered(self) -> list[dict[str, Any]]:
        return [body for status, body in self.requests if status < 300]


async def rules_settings(base: Settings, tmp_path: Path, rules: list[dict[str, Any]]) -> Settings:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rules": rules}))
    return await own_settings(
        base, rules_file=path, rules_group=unique("rules"), rules_instance_id=unique("rules"),
        rules_grace_s=0.5, writer_flush_interval_s=0.2,
    )  # fmt: skip


def alerts_of(reader: TopicReader) -> list[tuple[str, str, str, Any, int]]:
    return [(a["rule"], a["device_id"], a["state"], a["value"], a["ts"]) for a in reader.values()]


async def publish_series(
    s: Settings, device_id: str, series: list[tuple[int, dict[str, Any]]], t0: int, device_type: str
) -> None:
    async with DevicePublisher(s.mqtt.host, s.mqtt.port) as device:
        for seq, (offset_s, metrics) in enumerate(series):
            payload = {
                "type": device_type,
                "ts": t0 + offset_s * 1000,
                "seq": seq,
                "metrics": metrics,
            }
            await device.publish(f"devices/{device_id}/telemetry", json.dumps(payload).encode())


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    with WebhookServer([500, 500]) as server:
        yield server


async def test_threshold_alerts_commands_webhook_retries_and_influx(
    settings: Settings, tmp_path: Path, webhook: WebhookServer
) -> None:
    """A scripted series fires once after `for` and resolves at `clear`; the command
    reaches the device, the webhook is retried past two 500s and gets each alert once,
    and both alerts are points in InfluxDB."""
    s = await rules_settings(settings, tmp_path, [{
        "id": "too-warm", "kind": "threshold", "device_types": ["thermostat"],
        "metric": "temperature_c", "op": ">", "value": 30, "for": "60s", "clear": 28,
        "actions": [
            {"mqtt_command": {"payload": {"setpoint_c": 18}}}, {"webhook": {"url": webhook.url}},
        ],
    }])  # fmt: skip
    device_id = unique("thermo")
    await register(s, Device(device_id=device_id, type=DeviceType.THERMOSTAT, registered_at=0))
    t0 = now_ms() - 600_000
    commands: list[bytes] = []
    listener = DevicePublisher(s.mqtt.host, s.mqtt.port)

    def on_command(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        commands.append(payload)
        return 0

    listener.client.on_message = on_command
    try:
        async with (
            listener,
            TopicReader(s, Topics(s.topic_prefix).alerts, committed_only=True) as alerts,
            running_bridge(s),
            running(RulesService(s)),
            running_writer(s),
        ):
            listener.client.subscribe(f"devices/{device_id}/commands", qos=1)
            series = [
                (0, 31.0),
                (30, 32.0),
                (61, 33.0),
                (75, 29.5),
                (90, 31.0),
                (120, 28.0),
                (150, 27.0),
            ]
            await publish_series(
                s, device_id, [(t, {"temperature_c": v}) for t, v in series], t0, "thermostat"
            )
            await alerts.wait_for(2, 30)
            await until(lambda: len(webhook.delivered) == 2 and len(commands) == 1, 30, "actions")
            await until_points(s, "alerts", 2, field="message")
            await asyncio.sleep(1)  # a wrong extra alert would show by now
    finally:
        await forget_session(s)
    assert alerts_of(alerts) == [
        ("too-warm", device_id, "firing", 33.0, t0 + 61_000),
        ("too-warm", device_id, "resolved", 28.0, t0 + 120_000),
    ]
    assert json.loads(commands[0]) == {"setpoint_c": 18}
    assert [status for status, _ in webhook.requests] == [500, 500, 200, 200]
    assert [b["state"] for b in webhook.delivered] == ["firing", "resolved"]


async def test_state_rate_and_absence_rules_end_to_end(settings: Settings, tmp_path: Path) -> None:
    """A door held open, a temperature climbing fast (readings out of order within the
    grace), a sensor gone silent: each fires once and resolves."""
    s = await rules_settings(settings, tmp_path, [
        {"id": "door-open", "kind": "state", "device_types": ["contact"], "metric": "open",
         "equals": True, "for": "60s"},
        {"id": "rising", "kind": "rate", "device_types": ["thermostat"], "metric": "temperature_c",
         "per_minute": 2.0, "window": "60s"},
        {"id": "silent", "kind": "absence", "device_types": ["motion"], "after": "3s"},
    ])  # fmt: skip
    door, thermo, motion = unique("door"), unique("thermo"), unique("motion")
    await register(
        s,
        Device(device_id=door, type=DeviceType.CONTACT, registered_at=0),
        Device(device_id=thermo, type=DeviceType.THERMOSTAT, registered_at=0),
        Device(device_id=motion, type=DeviceType.MOTION, registered_at=0),
    )
    t0 = now_ms() - 600_000
    try:
        async with (
            TopicReader(s, Topics(s.topic_prefix).alerts, committed_only=True) as alerts,
            running_bridge(s),
            running(RulesService(s)),
        ):
            await publish_series(s, motion, [(590, {"motion": False})], t0, "motion")
            door_series = [(0, True), (30, True), (70, True), (80, False)]
            await publish_series(
                s, door, [(t, {"open": value}) for t, value in door_series], t0, "contact"
            )
            # Out of order within the grace: the engine must not see a jump backwards.
            climbing = [
                (0, 20.0),
                (20, 20.5),
                (10, 20.2),
                (40, 21.0),
                (30, 20.7),
                (60, 24.0),
                (70, 24.5),
                (130, 24.5),
                (200, 24.5),
            ]
            await publish_series(
                s, thermo, [(t, {"temperature_c": v}) for t, v in climbing], t0, "thermostat"
            )
            await until(
                lambda: any(a[2] == "firing" and a[0] == "silent" for a in alerts_of(alerts)),
                30,
                "absence",
            )
            await publish_series(s, motion, [(600, {"motion": True})], t0, "motion")
            await until(lambda: len(alerts.records) >= 6, 30, "six alerts")
            await asyncio.sleep(1)
    finally:
        await forget_session(s)
    got = alerts_of(alerts)
    assert [(r, d, st) for r, d, st, _, _ in got if r == "door-open"] == [
        ("door-open", door, "firing"), ("door-open", door, "resolved"),
    ]  # fmt: skip
    assert [(st, ts) for r, _, st, _, ts in got if r == "door-open"] == [
        ("firing", t0 + 70_000), ("resolved", t0 + 80_000),
    ]  # fmt: skip
    assert [st for r, _, st, _, _ in got if r == "rising"] == ["firing", "resolved"]
    # Silent again after its one reading: absence keeps alternating, as it should.
    assert [st for r, _, st, _, _ in got if r == "silent"][:2] == ["firing", "resolved"]


async def test_kill_9_while_firing_neither_repeats_nor_misses(
    settings: Settings, tmp_path: Path
) -> None:
    """kill -9 the engine while an alert is firing, resolve it during the downtime, restart:
    exactly one firing and one resolved in iot.alerts."""
    s = await rules_settings(settings, tmp_path, [{
        "id": "hot", "kind": "threshold", "device_types": ["thermostat"], "metric": "temperature_c",
        "op": ">", "value": 30, "clear": 28,
    }])  # fmt: skip
    device_id = unique("thermo")
    await register(s, Device(device_id=device_id, type=DeviceType.THERMOSTAT, registered_at=0))
    engine_settings = s.model_copy(update={"rules_grace_s": 0.5})
    log = tmp_path / "rules.log"

    t0 = now_ms() - 600_000
    engine = ServiceProcess("rules", engine_settings, log).start()
    try:
        async with (
            TopicReader(s, Topics(s.topic_prefix).alerts, committed_only=True) as alerts,
            running_bridge(s),
        ):
            await engine.ready()
            await publish_series(
                s,
                device_id,
                [(0, {"temperature_c": 31.0}), (10, {"temperature_c": 32.0})],
                t0,
                "thermostat",
            )
            await alerts.wait_for(1, 30)
            await asyncio.sleep(1.5)  # the engine commits the second reading's state too
            engine.kill()
            cooling = [(20, 33.0), (30, 27.0), (40, 26.0)]
            await publish_series(
                s, device_id, [(t, {"temperature_c": v}) for t, v in cooling], t0, "thermostat"
            )
            engine = ServiceProcess("rules", engine_settings, log).start()
            await alerts.wait_for(2, 60)
            await asyncio.sleep(2)
    finally:
        engine.kill()
        await forget_session(s)
    assert [(st, v, ts) for _, _, st, v, ts in alerts_of(alerts)] == [
        ("firing", 31.0, t0),
        ("resolved", 27.0, t0 + 30_000),
    ]
