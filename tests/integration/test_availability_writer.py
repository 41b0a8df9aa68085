"""The writer on iot.availability against real Kafka and InfluxDB: `availability` points
with registry tags, source and a boolean `online`, committed once written, and records
that cannot be points (or that InfluxDB refuses) as dead letters."""

from __future__ import annotations

import json

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import end_offsets, produce
from gateway.clock import now_ms
from gateway.domain.records import AvailabilityRecord
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from tests.conftest import unique
from tests.support import (
    TopicReader,
    canonical,
    influx_rows,
    own_settings,
    register,
    running_writer,
    until_points,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def writer_settings(settings: Settings) -> Settings:
    return await own_settings(settings, writer_flush_interval_s=0.2)


def availability(device_id: str, online: bool, ts: int, source: str) -> tuple[bytes, bytes]:
    """A record of iot.availability as the bridge writes it."""
    record = AvailabilityRecord(device_id=device_id, online=online, ts=ts, source=source)
    return device_id.encode(), json.dumps(record).encode()


async def committed(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    """The writer group's committed offset of each partition of `topic` (0 if none)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.writer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) or 0 for tp in await end_offsets(settings, topic)}
    finally:
        await consumer.stop()


async def test_availability_records_become_points_with_registry_tags_and_source(
    writer_settings: Settings,
) -> None:
    """Each record is one point of `availability`: tags device_id, site and room from the
    registry (none for a device it does not know) and source, a boolean field `online`, the
    record's ts as time; the writer commits the topic's offsets once they are written."""
    s = writer_settings
    plug, lamp = unique("plug"), unique("lamp")
    await register(
        s,
        Device(device_id=plug, type=DeviceType.SMART_PLUG, registered_at=0, site="home",
               room="kitchen"),
    )  # fmt: skip
    t0 = now_ms() - 60_000
    topic = Topics(s.topic_prefix).availability
    await produce(s, topic, [
        availability(plug, True, t0, "envelope"),
        availability(lamp, True, t0 + 500, "zigbee2mqtt"),
        availability(plug, False, t0 + 1000, "envelope"),
    ])  # fmt: skip
    async with running_writer(s) as writer:
        await until_points(s, "availability", 3, field="online")
    query = 'SELECT "online", "device_id", "site", "room", "source" FROM "availability"'
    assert await influx_rows(s, f"{query} WHERE \"device_id\" = '{plug}'") == [
        [t0, True, plug, "home", "kitchen", "envelope"],
        [t0 + 1000, False, plug, "home", "kitchen", "envelope"],
    ]
    assert await influx_rows(s, f"{query} WHERE \"device_id\" = '{lamp}'") == [
        [t0 + 500, True, lamp, None, None, "zigbee2mqtt"],
    ]
    assert await influx_rows(s, 'SHOW FIELD KEYS FROM "availability"') == [["online", "boolean"]]
    assert writer.metrics.points.labels("availability")._value.get() == 3
    assert await committed(s, topic) == await end_offsets(s, topic)


async def test_availability_records_refused_or_not_points_become_dead_letters(
    writer_settings: Settings,
) -> None:
    """A record whose `online` is no boolean is a `malformed` dead letter; one InfluxDB
    refuses (a field type conflict) an `influx_rejected` one; readings beside them are written."""
    s = writer_settings
    t0 = now_ms() - 60_000
    async with InfluxClient(str(s.influx_url)) as influx:
        # `online` as a string: every boolean `online` after it is a type conflict.
        await influx.write(s.influx_db, f'availability,device_id=seed online="x" {t0}')
    plug, thermo = unique("plug"), unique("thermo")
    topics = Topics(s.topic_prefix)
    bad = {"device_id": plug, "online": "yes", "ts": t0, "source": "envelope"}
    await produce(s, topics.availability, [
        availability(plug, False, t0 + 1, "envelope"), (plug.encode(), json.dumps(bad).encode()),
    ])  # fmt: skip
    await produce(s, topics.readings, [
        (thermo.encode(), canonical(thermo, "thermostat", i, t0 + i, temperature_c=21.0))
        for i in range(10)
    ])  # fmt: skip
    async with TopicReader(s, topics.dead_letters) as dead, running_writer(s):
        await until_points(s, "thermostat", 10)
        await dead.wait_for(2)
    letters = sorted(
        (dict(r.headers)["error"], dict(r.headers)["source_topic"], r.key) for r in dead.records
    )
    assert letters == [
        (b"influx_rejected", topics.availability.encode(), plug.encode()),
        (b"malformed", topics.availability.encode(), plug.encode()),
    ]
    written = f'SELECT "online" FROM "availability" WHERE "device_id" = \'{plug}\''
    assert await influx_rows(s, written) == []
