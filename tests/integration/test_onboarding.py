"""Pending devices against real Mosquitto and Kafka: held, approved, denied, limited."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import now_ms
from gateway.services.registry import DeviceRegistry
from gateway.settings import Settings
from gateway.topics import Topics
from tests.conftest import unique
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    reading_payload,
    running_bridge,
    service_env,
    until,
)

pytestmark = pytest.mark.integration


@asynccontextmanager
async def bridge_settings(settings: Settings, **overrides: Any) -> AsyncIterator[Settings]:
    """This test's own settings; the bridge's session is forgotten after."""
    own = await own_settings(settings, **overrides)
    try:
        yield own
    finally:
        await forget_session(own)


@pytest.fixture
async def holding(settings: Settings) -> AsyncIterator[Settings]:
    """A bridge's settings that hold unknown devices' readings."""
    async with bridge_settings(settings, unknown_devices="hold") as own:
        yield own


def z2m_source(tmp_path: Path, base_topic: str, **options: str) -> Path:
    """A sources file with one Zigbee2MQTT source of this test's own (our envelope's topics
    are every test's) and its options."""
    lines = ["sources:", "  - adapter: zigbee2mqtt", f"    base_topic: {base_topic}"]
    path = tmp_path / "sources.yaml"
    path.write_text("\n".join(lines + [f"    {k}: {v}" for k, v in options.items()]) + "\n")
    return path


async def iotgw(settings: Settings, *args: str) -> tuple[int, str]:
    """Run the CLI; its exit code and what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env=service_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode or 0, out.decode()


def of_device(reader: TopicReader, device_id: str) -> list[Any]:
    return [r for r in reader.records if r.key == device_id.encode()]


def held(reader: TopicReader, device_id: str) -> list[Any]:
    return [r for r in of_device(reader, device_id) if dict(r.headers).get("pending") == b"held"]


async def test_an_approved_device_gets_every_reading_in_its_order(holding: Settings) -> None:
    """1,000 readings held, approval while 1,000 more come: all in order, none twice."""
    s = holding
    topics = Topics(s.topic_prefix)
    device_id = unique("newcomer")
    topic = f"devices/{device_id}/telemetry"
    async with (
        running_bridge(s),
        TopicReader(s, topics.readings) as readings,
        TopicReader(s, topics.pending) as pending,
        DevicePublisher(s.mqtt.host, s.mqtt.port) as device,
    ):
        for seq in range(1000):
            await device.publish(topic, reading_payload(seq=seq))
        await until(lambda: len(held(pending, device_id)) >= 1000, 60, "1,000 held readings")
        code, listed = await iotgw(s, "devices", "pending", "--json")
        assert code == 0, listed
        [entry] = [d for d in json.loads(listed) if d["device_id"] == device_id]
        assert entry["held"] == 1000
        assert entry["type"] == "thermostat"
        assert entry["source"] == "envelope"
        assert of_device(readings, device_id) == []

        # The device keeps publishing while the approval runs, and a little after it.
        approving = asyncio.create_task(iotgw(s, "devices", "approve", device_id, "--site", "home"))
        total = 1000
        while total < 2000 or not approving.done():
            await device.publish(topic, reading_payload(seq=total))
            total += 1
            await asyncio.sleep(0.003)  # a device's pace
        for seq in range(total, total + 50):
            await device.publish(topic, reading_payload(seq=seq))
        total += 50
        code, said = approving.result()
        assert code == 0, said
        assert "held readings replayed into iot.readings" in said
        await until(lambda: len(of_device(readings, device_id)) >= total, 60, "every reading")
        code, listed = await iotgw(s, "devices", "pending", "--json")
    # Held while the approval ran, then straight through: the race was run.
    assert 1000 < len(held(pending, device_id)) < total
    seqs = [json.loads(r.value)["seq"] for r in of_device(readings, device_id)]
    assert seqs == list(range(total))
    assert all(r.partition == of_device(readings, device_id)[0].partition for r in readings.records
               if r.key == device_id.encode())  # fmt: skip
    assert device_id not in [d["device_id"] for d in json.loads(listed)]


async def test_a_denied_device_s_held_readings_become_dead_letters(holding: Settings) -> None:
    """`devices deny` turns each held reading into an unknown_device dead letter."""
    s = holding
    topics = Topics(s.topic_prefix)
    device_id = unique("stranger")
    async with (
        running_bridge(s),
        TopicReader(s, topics.dead_letters) as dead_letters,
        TopicReader(s, topics.pending) as pending,
    ):
        async with DevicePublisher(s.mqtt.host, s.mqtt.port) as device:
            for seq in range(20):
                await device.publish(f"devices/{device_id}/telemetry", reading_payload(seq=seq))
        await until(lambda: len(held(pending, device_id)) >= 20, 60, "20 held readings")
        code, said = await iotgw(s, "devices", "deny", device_id)
        assert code == 0, said
        assert f"denied {device_id}: 20 held readings" in said
        await until(lambda: len(of_device(dead_letters, device_id)) >= 20, 60, "20 dead letters")
        code, listed = await iotgw(s, "devices", "pending", "--json")
    letters = of_device(dead_letters, device_id)
    assert [json.loads(r.value)["seq"] for r in letters] == list(range(20))
    assert {dict(r.headers)["error"] for r in letters} == {b"unknown_device"}
    assert device_id not in [d["device_id"] for d in json.loads(listed)]
    code, said = await iotgw(s, "devices", "deny", device_id)
    assert code == 2
    assert "has no held readings" in said


async def test_devices_past_the_limit_are_dead_letters(settings: Settings, tmp_path: Path) -> None:
    """With IOTGW_PENDING_MAX_DEVICES=2, a third unknown device's readings are dead letters."""
    base = unique("z2m")
    sources = z2m_source(tmp_path, base, unknown_devices="hold")
    ids = [unique("crowd") for _ in range(3)]
    async with bridge_settings(settings, sources_file=sources, pending_max_devices=2) as s:
        topics = Topics(s.topic_prefix)
        async with (
            running_bridge(s),
            TopicReader(s, topics.dead_letters) as dead_letters,
            TopicReader(s, topics.pending) as pending,
            DevicePublisher(s.mqtt.host, s.mqtt.port) as device,
        ):
            for device_id in ids:
                for n in range(5):
                    state = json.dumps({"temperature": 20 + n, "humidity": 40}).encode()
                    await device.publish(f"{base}/{device_id}", state)
            await until(lambda: len(of_device(dead_letters, ids[2])) >= 5, 60, "5 dead letters")
            await until(lambda: len(held(pending, ids[1])) >= 5, 60, "5 held readings")
    assert len(held(pending, ids[0])) == 5
    assert held(pending, ids[2]) == []
    detail = dict(of_device(dead_letters, ids[2])[0].headers)["detail"].decode()
    assert "IOTGW_PENDING_MAX_DEVICES" in detail


async def test_held_readings_older_than_the_maximum_age_are_dead_letters(
    settings: Settings,
) -> None:
    """With IOTGW_PENDING_MAX_AGE_S=2, held readings become dead letters two seconds on."""
    device_id = unique("forgotten")
    async with bridge_settings(settings, unknown_devices="hold", pending_max_age_s=2) as s:
        topics = Topics(s.topic_prefix)
        async with (
            running_bridge(s),
            TopicReader(s, topics.dead_letters) as dead_letters,
            TopicReader(s, topics.pending) as pending,
        ):
            async with DevicePublisher(s.mqtt.host, s.mqtt.port) as device:
                for seq in range(5):
                    await device.publish(f"devices/{device_id}/telemetry", reading_payload(seq=seq))
            await until(lambda: len(of_device(dead_letters, device_id)) >= 5, 30, "5 dead letters")
            _, listed = await iotgw(s, "devices", "pending", "--json")
    letters = of_device(dead_letters, device_id)
    assert [json.loads(r.value)["seq"] for r in letters] == list(range(5))
    assert "was not approved within 2 s" in dict(letters[0].headers)["detail"].decode()
    assert len(held(pending, device_id)) == 5
    assert device_id not in [d["device_id"] for d in json.loads(listed)]


async def test_an_auto_approving_source_lets_a_new_device_in_by_itself(
    settings: Settings, tmp_path: Path
) -> None:
    """auto_approve: a new Zigbee2MQTT sensor is registered with its inferred type, and its
    readings, the held ones first, reach iot.readings without anyone approving it."""
    base = unique("z2m")
    sources = z2m_source(tmp_path, base, unknown_devices="hold", auto_approve="true")
    device_id = unique("hall")
    async with bridge_settings(settings, sources_file=sources) as s:
        topics = Topics(s.topic_prefix)
        async with (
            running_bridge(s),
            TopicReader(s, topics.readings) as readings,
            TopicReader(s, topics.pending) as pending,
            DevicePublisher(s.mqtt.host, s.mqtt.port) as device,
        ):
            for n in range(30):
                state = {"temperature": 20 + n / 10, "humidity": 40, "last_seen": now_ms()}
                await device.publish(f"{base}/{device_id}", json.dumps(state).encode())
            await until(lambda: len(of_device(readings, device_id)) >= 30, 60, "30 readings")
        async with DeviceRegistry(s) as registry:
            registered = registry.get(device_id)
    temperatures = [json.loads(r.value)["metrics"]["temperature_c"] for r in readings.records]
    assert temperatures == [20 + n / 10 for n in range(30)]
    assert held(pending, device_id), "its first readings waited for the registration"
    assert registered is not None
    assert registered.type == "climate"
