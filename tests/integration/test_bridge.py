"""The bridge against real Mosquitto and Kafka: order, acknowledgements, dead letters, health."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.clock import now_ms
from gateway.services.bridge.session import Bridge
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from tests.conftest import unique
from tests.raw_mqtt import ScriptedBroker, publish
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    reading_payload,
    register,
    running,
    running_bridge,
    until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def bridge_settings(settings: Settings) -> AsyncIterator[Settings]:
    own = await own_settings(settings)
    yield own
    await forget_session(own)


def thermostat(device_id: str, **fields: object) -> Device:
    return Device(device_id=device_id, type=DeviceType.THERMOSTAT, registered_at=0, **fields)


async def test_each_device_keeps_its_order_in_one_partition(bridge_settings: Settings) -> None:
    """20 devices x 500 readings: each device's readings land in one partition, in seq order."""
    s = bridge_settings
    ids = [unique("order") for _ in range(20)]
    await register(s, *(thermostat(i) for i in ids))
    per_device = 500
    async with (
        running_bridge(s),
        TopicReader(s, Topics(s.topic_prefix).readings) as readings,
    ):

        async def device(device_id: str) -> None:
            async with DevicePublisher(s.mqtt.host, s.mqtt.port) as publisher:
                for seq in range(per_device):
                    await publisher.publish(
                        f"devices/{device_id}/telemetry", reading_payload(seq=seq)
                    )

        await asyncio.gather(*(device(i) for i in ids))
        await readings.wait_for(20 * per_device)

    partitions: dict[str, set[int]] = defaultdict(set)
    seqs: dict[str, list[int]] = defaultdict(list)
    for record in sorted(readings.records, key=lambda r: (r.partition, r.offset)):
        value = json.loads(record.value)
        assert record.key.decode() == value["device_id"]
        assert dict(record.headers)["schema"] == b"reading/v1"
        partitions[value["device_id"]].add(record.partition)
        seqs[value["device_id"]].append(value["seq"])
    assert sorted(seqs) == sorted(ids)
    for device_id in ids:
        assert len(partitions[device_id]) == 1
        assert seqs[device_id] == list(range(per_device))


async def test_every_rejection_reason_gives_one_dead_letter(settings: Settings) -> None:
    """Each reason of DESIGN.md: one dead letter with its headers and the original bytes;
    valid readings in the same batch still reach iot.readings."""
    s = await own_settings(settings, rate_limit_per_s=0.001, rate_limit_burst=2)
    ok, off, flood = unique("ok"), unique("off"), unique("flood")
    await register(s, thermostat(ok), thermostat(off, enabled=False), thermostat(flood))
    now = now_ms()
    good = json.loads(reading_payload(seq=1))
    cases: list[tuple[str, str, bytes]] = [
        ("malformed", ok, b'{"type": "thermostat", '),
        ("too_large", ok, b"[" + b" " * 70_000 + b"]"),
        ("schema", ok, reading_payload(seq=2, temperature_c=20, colour="red")),
        ("id_mismatch", ok, json.dumps({**good, "device_id": "someone-else"}).encode()),
        ("unknown_device", unique("ghost"), reading_payload(seq=3)),
        ("device_disabled", off, reading_payload(seq=4)),
        ("type_mismatch", ok, reading_payload("motion", seq=5, motion=True)),
        ("clock_skew", ok, reading_payload(seq=6, ts=now + 3_600_000)),
    ]
    batch = [good, {**good, "seq": 7, "metrics": {"temperature_c": 999}}, {**good, "seq": 8}]
    topics = Topics(s.topic_prefix)
    try:
        async with (
            running_bridge(s),
            TopicReader(s, topics.dead_letters) as dead,
            TopicReader(s, topics.readings) as readings,
        ):
            async with DevicePublisher(s.mqtt.host, s.mqtt.port) as device:
                for _, device_id, payload in cases:
                    await device.publish(f"devices/{device_id}/telemetry", payload)
                await device.publish(f"devices/{ok}/telemetry", json.dumps(batch).encode())
                for seq in range(3):  # the third is over the burst of 2
                    await device.publish(f"devices/{flood}/telemetry", reading_payload(seq=seq))
            await dead.wait_for(len(cases) + 2)
            await readings.wait_for(4)
            await asyncio.sleep(0.5)  # a surplus record would show up now
    finally:
        await forget_session(s)

    letters = [(dict(r.headers), r) for r in dead.records]
    assert len(letters) == len(cases) + 2
    by_reason = defaultdict(list)
    for headers, record in letters:
        by_reason[headers["error"].decode()].append((headers, record))
    assert sorted(by_reason) == sorted({reason for reason, _, _ in cases} | {"rate_limited"})
    for reason, device_id, payload in cases:
        [(headers, record)] = by_reason[reason] if reason != "schema" else by_reason[reason][:1]
        assert record.value == payload[:65536]
        assert record.key == device_id.encode()
        assert headers["mqtt_topic"] == f"devices/{device_id}/telemetry".encode()
        assert headers["detail"]
        assert abs(int(headers["received_at"]) - now) < 60_000
    assert len(by_reason["schema"]) == 2  # the unknown metric and the batch's bad reading
    assert json.loads(by_reason["schema"][1][1].value)["seq"] == 7
    assert by_reason["rate_limited"][0][1].key == flood.encode()
    assert sorted((v["device_id"], v["seq"]) for v in readings.values()) == sorted(
        [(ok, 1), (ok, 8), (flood, 0), (flood, 1)]
    )


async def test_pubacks_leave_in_arrival_order_while_kafka_finishes_in_another(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker on a raw socket sends 3,000 readings of 30 devices at once, ignoring the
    receive maximum of 500, to a bridge with two workers: the workers and Kafka's six
    partitions finish them in another order, yet the PUBACK packet ids leave exactly in
    the order the PUBLISH packets arrived, at most 500 are ever in flight, and every
    device's readings are in its partition in order."""
    ids = [unique("acked") for _ in range(30)]
    async with ScriptedBroker() as broker:
        s = await own_settings(
            settings, mqtt_url=SecretStr(f"mqtt://127.0.0.1:{broker.port}"),
            bridge_workers=2, max_in_flight=500,
        )  # fmt: skip
        await register(s, *(thermostat(i) for i in ids))
        bridge = Bridge(s)
        finished: list[int] = []
        peak = 0
        complete = bridge.session.complete

        def observed(indices: list[int]) -> None:
            nonlocal peak
            peak = max(peak, bridge.session.in_flight)
            finished.extend(indices)
            complete(indices)

        monkeypatch.setattr(bridge.session, "complete", observed)
        sent = [(device_id, seq) for seq in range(100) for device_id in ids]
        async with (
            running(bridge),
            TopicReader(s, Topics(s.topic_prefix).readings) as readings,
        ):
            connection = await broker.connection(0)
            connection.send(
                b"".join(
                    publish(f"devices/{device_id}/telemetry", reading_payload(seq=seq), number)
                    for number, (device_id, seq) in enumerate(sent, start=1)
                )
            )
            await until(lambda: len(connection.acks) == len(sent), 60, "every PUBACK")
            await readings.wait_for(len(sent))
    assert connection.acks == list(range(1, len(sent) + 1))
    assert finished != sorted(finished), "Kafka finished them in arrival order"
    assert sorted(finished) == list(range(len(sent)))
    assert peak <= 500
    seqs: dict[str, list[int]] = defaultdict(list)
    for record in sorted(readings.records, key=lambda r: (r.partition, r.offset)):
        value = json.loads(record.value)
        seqs[value["device_id"]].append(value["seq"])
    assert all(seqs[device_id] == list(range(100)) for device_id in ids)


async def test_a_share_group_makes_a_shared_subscription_with_a_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """IOTGW_MQTT_SHARE_GROUP set: the bridge subscribes to $share/<group>/..., warns that
    order holds only on brokers with sticky shared subscriptions, and readings flow."""
    s = await own_settings(settings, mqtt_share_group=unique("g"))
    device_id = unique("shared")
    await register(s, thermostat(device_id))
    try:
        async with (
            running_bridge(s) as bridge,
            TopicReader(s, Topics(s.topic_prefix).readings) as readings,
        ):
            group = f"$share/{s.mqtt_share_group}"
            assert bridge.subscriptions == (
                f"{group}/devices/+/telemetry", f"{group}/devices/+/status",
            )  # fmt: skip
            async with DevicePublisher(s.mqtt.host, s.mqtt.port) as device:
                await device.publish(f"devices/{device_id}/telemetry", reading_payload(seq=1))
            await readings.wait_for(1)
    finally:
        await forget_session(s)
    events: list[Any] = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    [warning] = [e for e in events if e["event"] == "shared_subscription"]
    assert "sticky per publisher" in warning["warning"]


async def test_a_payload_of_megabytes_is_a_too_large_dead_letter(
    bridge_settings: Settings,
) -> None:
    """A device publishes 8 MiB (Mosquitto takes up to 256 MB): the bridge keeps only its
    first 64 KiB (the rest is dropped as it arrives), the dead letter names the real size,
    and the device's next reading arrives."""
    s = bridge_settings
    device_id = unique("big")
    await register(s, thermostat(device_id))
    big = b"[" + b" " * (8 * 1024 * 1024) + b"]"
    topics = Topics(s.topic_prefix)
    async with (
        running_bridge(s),
        TopicReader(s, topics.dead_letters) as dead,
        TopicReader(s, topics.readings) as readings,
    ):
        async with DevicePublisher(s.mqtt.host, s.mqtt.port) as device:
            await device.publish(f"devices/{device_id}/telemetry", big)
            await device.publish(f"devices/{device_id}/telemetry", reading_payload(seq=1))
        await readings.wait_for(1)
        await dead.wait_for(1)
    [letter] = dead.records
    headers = dict(letter.headers)
    assert headers["error"] == b"too_large"
    assert f"payload of {len(big)} bytes".encode() in headers["detail"]
    assert letter.value == big[:65536]


async def test_health_and_metrics_endpoints(bridge_settings: Settings) -> None:
    """/readyz is 200 once MQTT, Kafka and the registry are up; /metrics counts readings."""
    s = bridge_settings
    device_id = unique("metered")
    await register(s, thermostat(device_id))
    async with running_bridge(s) as bridge:
        assert bridge.health is not None
        base = f"http://127.0.0.1:{bridge.health.port}"
        async with DevicePublisher(s.mqtt.host, s.mqtt.port) as device:
            await device.publish(f"devices/{device_id}/telemetry", reading_payload(seq=1))
            await device.publish(f"devices/{device_id}/telemetry", b"garbage")

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(base + path, timeout=5) as response:
                return response.status, response.read().decode()

        def published() -> bool:
            text = get("/metrics")[1]
            return (
                "iotgw_bridge_readings_published_total 1.0" in text
                and 'iotgw_bridge_readings_rejected_total{reason="malformed"} 1.0' in text
            )

        for _ in range(100):
            if await asyncio.to_thread(published):
                break
            await asyncio.sleep(0.05)
        status, body = await asyncio.to_thread(get, "/readyz")
        metrics = (await asyncio.to_thread(get, "/metrics"))[1]
        health = await asyncio.to_thread(get, "/healthz")
    assert (status, json.loads(body)) == (200, {"mqtt": True, "kafka": True, "registry": True})
    assert health[0] == 200
    assert "iotgw_bridge_readings_published_total 1.0" in metrics
    assert 'iotgw_bridge_readings_rejected_total{reason="malformed"} 1.0' in metrics
    assert "iotgw_bridge_kafka_publish_seconds_bucket" in metrics
    assert "iotgw_bridge_in_flight 0.0" in metrics
