"""The writer against real Kafka and InfluxDB: points, replays, refusals, alerts."""

from __future__ import annotations

import json

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import SecretStr

from devstack import stack
from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import produce, topic_partitions
from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.services.writer import Writer
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from tests.conftest import unique
from tests.support import (
    TopicReader,
    canonical,
    influx_count,
    influx_rows,
    own_settings,
    register,
    running_writer,
    set_up,
    until,
    until_points,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def writer_settings(any_influx: Settings) -> Settings:
    """This test's own topics and database, on InfluxDB 1.6.7 and on 2.7."""
    return await own_settings(any_influx, writer_flush_interval_s=0.2)


async def test_every_reading_becomes_exactly_one_point(writer_settings: Settings) -> None:
    """Each reading: one point in its type's measurement, registry tags, typed fields, ts."""
    s = writer_settings
    plug, door = unique("plug"), unique("door")
    await register(
        s,
        Device(
            device_id=plug, type=DeviceType.SMART_PLUG, registered_at=0, site="home", room="kitchen"
        ),
        Device(device_id=door, type=DeviceType.CONTACT, registered_at=0, site="home"),
    )
    t0 = now_ms() - 60_000
    plugs = [
        (plug.encode(), canonical(plug, "smart_plug", i, t0 + i * 10, on=True, power_w=100.0 + i))
        for i in range(300)
    ]
    doors = [
        (door.encode(), canonical(door, "contact", i, t0 + i, open=i % 2 == 0)) for i in range(200)
    ]
    await produce(s, Topics(s.topic_prefix).readings, plugs + doors)
    async with running_writer(s):
        await until_points(s, "smart_plug", 300)
        await until_points(s, "contact", 200)
    rows = await influx_rows(
        s,
        'SELECT "power_w", "on", "seq", "device_id", "site", "room" FROM "smart_plug" '
        f'WHERE "device_id" = \'{plug}\' AND "seq" = 7',
    )
    assert rows == [[t0 + 70, 107.0, True, 7, plug, "home", "kitchen"]]
    door_rows = await influx_rows(s, 'SELECT "open", "room", "site" FROM "contact" WHERE "seq" = 3')
    assert door_rows == [[t0 + 3, False, None, "home"]]
    assert (await influx_count(s, "smart_plug"), await influx_count(s, "contact")) == (300, 200)


def thermostat_readings(device: str, count: int) -> list[tuple[bytes | None, bytes]]:
    """`count` canonical readings of thermostat `device`, a millisecond apart, a minute old."""
    t0 = now_ms() - 60_000
    return [
        (device.encode(), canonical(device, "thermostat", i, t0 + i, temperature_c=20.0))
        for i in range(count)
    ]


async def rewind_group(settings: Settings) -> None:
    """Reset the writer's group to the earliest offsets, as an operator would for a replay."""
    topics = Topics(settings.topic_prefix)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.writer_group,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in (topics.readings, topics.alerts, topics.dead_letters)
            for p in await topic_partitions(settings, topic)
        ]
        consumer.assign(partitions)
        await consumer.commit(dict.fromkeys(partitions, 0))
    finally:
        await consumer.stop()


async def test_replay_from_the_earliest_offset_adds_no_point(writer_settings: Settings) -> None:
    """Reset the group to the start and run the writer again: the point count stays."""
    s = writer_settings
    await produce(s, Topics(s.topic_prefix).readings, thermostat_readings(unique("thermo"), 500))
    async with running_writer(s):
        await until_points(s, "thermostat", 500)
    await rewind_group(s)
    async with running_writer(s) as again:
        await until_points_written(again, 500)
    assert await influx_count(s, "thermostat") == 500


async def until_points_written(writer: Writer, count: int) -> None:
    points = writer.metrics.points.labels("readings")
    await until(lambda: points._value.get() >= count, 60, "points rewritten")


async def test_refused_points_become_dead_letters_and_the_rest_is_written(
    writer_settings: Settings,
) -> None:
    """InfluxDB refuses points whose field type conflicts (4xx): those go to the dead-letter
    topic as influx_rejected; every other point of the batches is written."""
    s = writer_settings
    t0 = now_ms() - 60_000
    async with InfluxClient.for_settings(s) as influx:
        # humidity_pct as a string: every float humidity_pct after it is a type conflict.
        await influx.write(s.influx_database, f'air_quality,device_id=seed humidity_pct="x" {t0}')
    good, bad = unique("thermo"), unique("aq")
    records: list[tuple[bytes | None, bytes]] = []
    for i in range(100):
        records.append(
            (good.encode(), canonical(good, "thermostat", i, t0 + i, temperature_c=21.0))
        )
        if i % 25 == 0:
            records.append(
                (bad.encode(), canonical(bad, "air_quality", i, t0 + i, humidity_pct=40.0))
            )
    topics = Topics(s.topic_prefix)
    await produce(s, topics.readings, records)
    async with (
        TopicReader(s, topics.dead_letters) as dead,
        running_writer(s) as writer,
    ):
        await until_points(s, "thermostat", 100)
        await dead.wait_for(4)
        await until_points(s, "rejected", 4, field="bytes")
    refused = [(dict(r.headers), r) for r in dead.records]
    assert len(refused) == 4
    for headers, record in refused:
        assert headers["error"] == b"influx_rejected"
        assert b"conflict" in headers["detail"]
        assert record.key == bad.encode()
        assert json.loads(record.value)["device_id"] == bad
    assert writer.metrics.dead_letters.labels("influx_rejected")._value.get() == 4
    assert await influx_count(s, "thermostat") == 100
    rejected = await influx_rows(s, 'SELECT "detail", "reason" FROM "rejected"')
    assert {row[2] for row in rejected} == {"influx_rejected"}


async def test_alerts_are_written_to_the_alerts_measurement(writer_settings: Settings) -> None:
    """iot.alerts records become points of `alerts`, firing and resolved apart."""
    s = writer_settings
    device = unique("door")
    await register(
        s, Device(device_id=device, type=DeviceType.CONTACT, registered_at=0, site="flat")
    )
    t0 = now_ms() - 60_000
    alerts = [
        {"rule": "door-left-open", "device_id": device, "state": "firing", "value": True,
         "ts": t0, "message": "open for 10m"},
        {"rule": "door-left-open", "device_id": device, "state": "resolved", "value": False,
         "ts": t0 + 5000, "message": "closed"},
    ]  # fmt: skip
    await produce(
        s,
        Topics(s.topic_prefix).alerts,
        [(device.encode(), json.dumps(a).encode()) for a in alerts],
    )
    async with running_writer(s):
        await until_points(s, "alerts", 2, field="message")
    rows = await influx_rows(
        s, 'SELECT "state", "value", "message", "rule", "site" FROM "alerts" ORDER BY time'
    )
    assert rows == [
        [t0, "firing", 1.0, "open for 10m", "door-left-open", "flat"],
        [t0 + 5000, "resolved", 0.0, "closed", "door-left-open", "flat"],
    ]


async def test_a_reading_older_than_the_retention_is_a_dead_letter_saying_so(
    writer_settings: Settings,
) -> None:
    """Raw readings kept 1 h: a 3-hour-old reading is refused by InfluxDB and becomes an
    `influx_rejected` dead letter naming the retention; the recent ones are points."""
    s = writer_settings.model_copy(update={"influx_retention": 3600})
    device = unique("thermo")
    now = now_ms()
    records = [
        (device.encode(), canonical(device, "thermostat", i, now - 60_000 + i, temperature_c=20.0))
        for i in range(20)
    ]
    old = canonical(device, "thermostat", 999, now - 3 * 3_600_000, temperature_c=19.0)
    records.insert(10, (device.encode(), old))
    topics = Topics(s.topic_prefix)
    async with set_up(s):
        await produce(s, topics.readings, records)
        async with TopicReader(s, topics.dead_letters) as dead, running_writer(s):
            await until_points(s, "thermostat", 20)
            await dead.wait_for(1)
        assert await influx_count(s, "thermostat") == 20
    [refused] = dead.records
    headers = dict(refused.headers)
    assert headers["error"] == b"influx_rejected"
    assert b"retention" in headers["detail"]
    assert refused.value == old


async def test_a_wrong_influxdb2_token_stops_the_writer_with_one_line(
    settings: Settings, influxdb2_stack: stack.StackPlan
) -> None:
    """InfluxDB 2.x refuses the token: the writer stops at start saying so, token unshown."""
    s = await own_settings(stack.influx_settings(influxdb2_stack, settings))
    wrong = s.model_copy(update={"influx_token": SecretStr("not-the-token")})
    with pytest.raises(IotgwError, match=r"^InfluxDB refused the token: ") as refused:
        async with running_writer(wrong):
            pass
    assert "not-the-token" not in str(refused.value)


async def write_only_token(settings: Settings) -> str:
    """A 2.x token that may write to the settings' bucket and do nothing else."""
    assert settings.influx_token is not None
    admin = {"Authorization": f"Token {settings.influx_token.get_secret_value()}"}
    async with httpx.AsyncClient(base_url=str(settings.influx_url), headers=admin) as http:
        org = (await http.get("/api/v2/orgs", params={"org": settings.influx_org})).json()
        bucket = (await http.get("/api/v2/buckets", params={"name": settings.influx_bucket})).json()
        org_id, bucket_id = org["orgs"][0]["id"], bucket["buckets"][0]["id"]
        resource = {"type": "buckets", "id": bucket_id, "orgID": org_id}
        body = {"orgID": org_id, "permissions": [{"action": "write", "resource": resource}]}
        made = await http.post("/api/v2/authorizations", json=body)
    return str(made.json()["token"])


async def test_a_token_that_may_only_write_the_bucket_is_all_the_writer_needs(
    settings: Settings, influxdb2_stack: stack.StackPlan
) -> None:
    """InfluxDB 2.x, a token with write access to the bucket alone: every reading is a
    point; for another bucket the writer stops at start, saying what the token lacks."""
    s = await own_settings(
        stack.influx_settings(influxdb2_stack, settings), writer_flush_interval_s=0.2
    )
    token = SecretStr(await write_only_token(s))
    await produce(s, Topics(s.topic_prefix).readings, thermostat_readings(unique("thermo"), 50))
    async with running_writer(s.model_copy(update={"influx_token": token})):
        await until_points(s, "thermostat", 50)
    other = await own_settings(stack.influx_settings(influxdb2_stack, settings))
    with pytest.raises(IotgwError, match=r"^the token may not write to bucket ") as refused:
        async with running_writer(other.model_copy(update={"influx_token": token})):
            pass
    assert "insufficient permissions for write" in str(refused.value)
