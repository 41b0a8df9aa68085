"""A device's last will through the real servers: its connection is cut, Mosquitto sends
the will, a live bridge makes it an iot.availability record, and the `offline` alert it
raises and resolves is in iot.alerts once each across a kill -9 of the rules engine."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from gmqtt import Client, Message

from gateway.adapters.kafka import read_topic
from gateway.adapters.mqtt import connect, publish_in_window
from gateway.settings import MqttEndpoint, Settings
from gateway.topics import Topics, status_topic
from schemas import Device, DeviceType
from simulators.processes import ServiceProcess, free_ports
from tests.conftest import unique
from tests.faults.tcp_proxy import TcpProxy
from tests.faults.test_bridge_faults import bridge_process
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    register,
    until,
)

pytestmark = pytest.mark.faults


@contextlib.asynccontextmanager
async def device_online(device_id: str, host: str, port: int) -> AsyncIterator[Client]:
    """A device connected to `host:port` with `offline` as its last will on its status
    topic, which says `online` once connected (as our simulators do); it disconnects
    cleanly at the end, unless its connection was cut before."""
    status = status_topic(device_id)
    client = Client(device_id, will_message=Message(status, b"offline", qos=1))
    # A device whose network is cut stays away until the test brings it back.
    client.set_config({"reconnect_retries": 0})
    await connect(client, MqttEndpoint(host, port, False, None, None), ca_file=None, timeout_s=10)
    await publish_in_window(client, status, b"online")
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def said(availability: TopicReader, device_id: str) -> list[bool]:
    """What iot.availability holds about the device so far: online (True) or offline."""
    return [v["online"] for v in availability.values() if v["device_id"] == device_id]


def alerted(alerts: TopicReader | list[Any], device_id: str) -> list[tuple[str, str, Any]]:
    """The device's alerts so far: (rule, state, value) each."""
    values = alerts.values() if isinstance(alerts, TopicReader) else alerts
    return [(a["rule"], a["state"], a["value"]) for a in values if a["device_id"] == device_id]


async def test_last_will_fires_and_resolves_an_offline_alert_once_across_a_rules_kill_9(
    settings: Settings, tmp_path: Path
) -> None:
    """A device's connection is cut: the broker's last will reaches the bridge, and the
    `offline` rule (for 2 s) fires. The engine is killed -9 and restarted; another device
    going offline then fires (the restarted engine runs its clock), and the first coming
    back online resolves: iot.alerts holds one firing and one resolved for the first."""
    plug, lamp = unique("plug"), unique("lamp")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rules": [
        {"id": "gone", "kind": "offline", "devices": [plug, lamp], "for": "2s"},
    ]}))  # fmt: skip
    s = await own_settings(
        settings, rules_file=rules, rules_group=unique("rules"), rules_instance_id=unique("rules")
    )
    await register(
        s,
        Device(device_id=plug, type=DeviceType.SMART_PLUG, registered_at=0, site="home"),
        Device(device_id=lamp, type=DeviceType.SMART_PLUG, registered_at=0, site="home"),
    )
    topics, log = Topics(s.topic_prefix), tmp_path / "rules.log"
    host, broker_port = s.mqtt.host, s.mqtt.port
    engine = ServiceProcess("rules", s, log).start()
    try:
        # Each process is ready (its metrics port bound) before the next picks a free port.
        await engine.ready()
        async with (
            TopicReader(s, topics.availability) as availability,
            TopicReader(s, topics.alerts, committed_only=True) as alerts,
            bridge_process(s, tmp_path / "bridge.log"),
            TcpProxy(free_ports(1), broker_port) as network,
        ):
            async with device_online(plug, "127.0.0.1", network.port):
                await until(lambda: said(availability, plug) == [True], 30, "plug online")
                network.cut()  # no DISCONNECT: the broker sends the device's last will
                await until(lambda: said(availability, plug) == [True, False], 30, "the will")
                await until(lambda: alerted(alerts, plug) == [("gone", "firing", 0)], 30, "firing")
            engine.kill()
            engine = ServiceProcess("rules", s, log).start()
            await engine.ready()
            async with DevicePublisher(host, broker_port) as other:
                await other.publish(status_topic(lamp), b"offline")
            await until(lambda: alerted(alerts, lamp) == [("gone", "firing", 0)], 30, "lamp")
            async with device_online(plug, host, broker_port):
                await until(lambda: len(alerted(alerts, plug)) == 2, 30, "resolved")
        assert engine.stop() == 0
    finally:
        engine.kill()
        await forget_session(s)
    records: list[Any] = []
    await read_topic(s, topics.alerts, records.extend, committed_only=True)
    final = [json.loads(r.value) for r in records]
    assert alerted(final, plug) == [("gone", "firing", 0), ("gone", "resolved", 1)]
    assert alerted(final, lamp) == [("gone", "firing", 0)]
