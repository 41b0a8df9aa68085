"""Device sources under a broken network: Home Assistant discovery follows what changed
while the bridge's connections were cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import SecretStr

from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device
from simulators.processes import free_ports
from tests.conftest import unique
from tests.faults.tcp_proxy import TcpProxy
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    register,
    running_bridge,
    until,
)

pytestmark = pytest.mark.faults


def config(state_topic: str, device_id: str) -> bytes:
    return json.dumps(
        {"dev_cla": "temperature", "stat_t": state_topic, "unit_of_meas": "°C",
         "dev": {"ids": [device_id]}}
    ).encode()  # fmt: skip


async def test_discovery_catches_up_on_configs_changed_while_the_network_was_cut(
    settings: Settings, tmp_path: Path
) -> None:
    """The bridge's connections to Mosquitto are cut; meanwhile one entity is removed and
    another added (retained configs). Once the network is back, the bridge has forgotten
    the one, learned the other and reads its states."""
    prefix = unique("ha")
    sources = tmp_path / "sources.yaml"
    sources.write_text(f"sources:\n  - adapter: homeassistant\n    discovery_prefix: {prefix}\n")
    port = free_ports(1)
    s = await own_settings(
        settings,
        sources_file=sources,
        mqtt_url=SecretStr(f"mqtt://127.0.0.1:{port}"),
        timeout_s=5.0,
    )
    kept, removed, added = unique("kept"), unique("removed"), unique("added")
    await register(s, *(Device(device_id=d, type="climate", registered_at=0)
                        for d in (kept, removed, added)))  # fmt: skip
    topics = {d: f"{prefix}/sensor/{d}/config" for d in (kept, removed, added)}
    host, mqtt_port = settings.mqtt.host, settings.mqtt.port
    try:
        async with (
            TcpProxy(port, mqtt_port) as proxy,
            DevicePublisher(host, mqtt_port) as publisher,
            TopicReader(s, Topics(s.topic_prefix).readings) as readings,
        ):
            for device in (kept, removed):
                await publisher.publish(topics[device], config(f"t/{device}", device), retain=True)
            async with running_bridge(s) as bridge:
                homeassistant = bridge.sources.homeassistant
                assert homeassistant is not None
                assert set(homeassistant.entities) == {topics[kept], topics[removed]}
                proxy.cut()
                await until(lambda: not bridge.session.connected, 10, "the bridge cut off")
                await publisher.publish(topics[removed], b"", retain=True)
                await publisher.publish(topics[added], config(f"t/{added}", added), retain=True)
                proxy.restore()
                await until(
                    lambda: set(homeassistant.entities) == {topics[kept], topics[added]},
                    60, "the discovery caught up",
                )  # fmt: skip
                await until(lambda: f"t/{added}" in bridge.session.subscriptions, 30, "subscribed")
                await until(lambda: bridge.session.subscribed, 30, "the session back")
                assert f"t/{removed}" not in bridge.session.subscriptions
                await publisher.publish(f"t/{added}", b"21.5")
                await readings.wait_for(1)
    finally:
        async with DevicePublisher(host, mqtt_port) as publisher:
            for topic in topics.values():
                await publisher.publish(topic, b"", retain=True)
        await forget_session(s.model_copy(update={"mqtt_url": settings.mqtt_url}))
    [reading] = readings.values()
    assert (reading["device_id"], reading["metrics"]) == (added, {"temperature_c": 21.5})
