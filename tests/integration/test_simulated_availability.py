"""A simulated fleet's availability through real Mosquitto, the live bridge and Kafka: each
device online before it sends and offline at the end, a dropped device's last will and its
return in iot.availability, and the loss audit unchanged by the drops."""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from gateway.settings import Settings
from gateway.topics import Topics
from simulators.audit import SendLog, audit_until_settled
from simulators.fleet import build_fleet
from simulators.formats import Format, bridge_state, presence
from simulators.runner import run_simulation
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    mixed_home_settings,
    running_bridge,
    running_writer,
    until,
)

pytestmark = pytest.mark.integration

DEVICES = 20


async def test_dropped_devices_go_offline_by_their_will_and_come_back(
    settings: Settings, tmp_path: Path
) -> None:
    """A mixed fleet with the drop fault: in iot.availability every device is online first,
    then offline and online again once per return from a drop, and offline last, in its own
    format's source; drops came back on connections of their own and on Zigbee2MQTT's; the
    audit loses nothing and counts nothing twice."""
    # Its own device ids (they come from the seed) and Zigbee2MQTT base topic: no other
    # run's fleet speaks for these devices.
    seed = uuid.uuid4().int % 1_000_000
    s, base_topic = await mixed_home_settings(settings, tmp_path)
    fleet = build_fleet(DEVICES, seed, "mixed", base_topic=base_topic)
    log = tmp_path / "sent.jsonl"
    try:
        async with (
            running_bridge(s),
            running_writer(s),
            TopicReader(s, Topics(s.topic_prefix).availability) as availability,
        ):
            stats = await run_simulation(
                s, devices=DEVICES, rate=100, duration=20, qos=1, faults={"drop": 0.02},
                register=True, log=log, seed=seed, fleet_format="mixed", base_topic=base_topic,
            )  # fmt: skip
            # Online, offline and online again per return, offline at the end.
            expected = {d.device_id: [True, *[False, True] * stats.returns[d.device_id], False]
                        for d in fleet}  # fmt: skip
            total = sum(len(states) for states in expected.values())
            await until(lambda: len(availability.records) >= total, 30, f"{total} records")
            report = await audit_until_settled(s, SendLog.read(log), 60)
    finally:
        await forget_session(s)
        # The availability messages are retained: leave none behind in the broker.
        async with DevicePublisher(s.mqtt.host, s.mqtt.port) as publisher:
            for topic in [presence(d.firmware, True)[0] for d in fleet]:
                await publisher.publish(topic, b"", retain=True)
            await publisher.publish(bridge_state(base_topic, True)[0], b"", retain=True)
    states: dict[str, list[bool]] = defaultdict(list)
    sources_seen: dict[str, set[str]] = defaultdict(set)
    for record in availability.values():
        states[record["device_id"]].append(record["online"])
        sources_seen[record["device_id"]].add(record["source"])
    assert states == expected, f"seed {seed}"
    assert sources_seen == {d.device_id: {d.format.value} for d in fleet}
    assert stats.drops.total() == stats.faults["drop"] > 0
    came_back = {d.format for d in fleet if stats.returns[d.device_id]}
    assert Format.ZIGBEE2MQTT in came_back
    assert came_back & {Format.ENVELOPE, Format.TASMOTA, Format.SHELLY}
    assert report.lost == 0, report.lost_examples
    assert report.in_kafka == report.valid_sent == report.sent
    assert report.duplicates == 0
