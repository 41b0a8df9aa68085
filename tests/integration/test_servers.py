"""Each server of the local stack is real: MQTT, Kafka and InfluxDB round trips."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import NewTopic
from gmqtt import Client

from devstack.installer import ensure_kafka
from devstack.stack import LOCAL_TEMPLATES
from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import create_producer, kafka_admin
from gateway.settings import Settings
from tests.conftest import unique

pytestmark = pytest.mark.integration


async def create_topic(settings: Settings, partitions: int, replication: int = 1) -> str:
    name = unique("test-topic")
    async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
        await admin.create_topics([NewTopic(name, partitions, replication)])
    return name


async def consume(settings: Settings, topic: str, count: int) -> list[Any]:
    """Read `count` records of `topic` from the beginning, or fail after 30 s."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(records) < count:
                batches = await consumer.getmany(timeout_ms=500)
                for batch in batches.values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_mqtt_round_trip_through_mosquitto(settings: Settings) -> None:
    """A QoS 1 message published to Mosquitto reaches a subscriber unchanged."""
    topic = f"test/{unique('roundtrip')}"
    received: asyncio.Queue[bytes] = asyncio.Queue()
    subscribed = asyncio.Event()

    def on_message(client: Client, topic: str, payload: bytes, qos: int, props: Any) -> int:
        received.put_nowait(payload)
        return 0

    subscriber, publisher = Client(unique("sub")), Client(unique("pub"))
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    endpoint = settings.mqtt
    await subscriber.connect(endpoint.host, endpoint.port)
    await publisher.connect(endpoint.host, endpoint.port)
    try:
        subscriber.subscribe(topic, qos=1)
        await asyncio.wait_for(subscribed.wait(), 10)
        payload = b'{"temperature_c": 21.5}'
        publisher.publish(topic, payload, qos=1)
        assert await asyncio.wait_for(received.get(), 10) == payload
    finally:
        await subscriber.disconnect()
        await publisher.disconnect()


async def test_kafka_produce_and_consume_keyed(settings: Settings) -> None:
    """Records produced with acks=all come back in order, with their keys, per partition."""
    topic = await create_topic(settings, partitions=3)
    producer = create_producer(settings)
    await producer.start()
    try:
        for i in range(20):
            await producer.send_and_wait(topic, f"reading {i}".encode(), key=b"thermo-1")
    finally:
        await producer.stop()
    records = await consume(settings, topic, 20)
    assert [r.value for r in records] == [f"reading {i}".encode() for i in range(20)]
    assert {r.key for r in records} == {b"thermo-1"}
    assert len({r.partition for r in records}) == 1


def java_client_partitions(partitions: int, keys: list[str]) -> list[int]:
    """The partitions Kafka's own Java client picks for `keys` (Murmur2Partition.java)."""
    kafka = ensure_kafka(LOCAL_TEMPLATES / "pom.xml", Path("/dev/null"), print)
    program = Path(__file__).with_name("Murmur2Partition.java")
    result = subprocess.run(
        ["java", "-cp", kafka.classpath, str(program), str(partitions), *keys],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [int(line) for line in result.stdout.split()]


async def test_keyed_record_lands_where_java_client_puts_it(settings: Settings) -> None:
    """aiokafka's partitioner agrees with the Java client's murmur2 for every key."""
    partitions = 6
    topic = await create_topic(settings, partitions=partitions)
    keys = [f"device-{i}" for i in range(40)] + ["thermo-kitchen", "plug_ü_1", "a"]
    producer = create_producer(settings)
    await producer.start()
    try:
        metadata = [await producer.send_and_wait(topic, b"x", key=k.encode()) for k in keys]
    finally:
        await producer.stop()
    java_partitions = await asyncio.to_thread(java_client_partitions, partitions, keys)
    assert [m.partition for m in metadata] == java_partitions
    assert len({m.partition for m in metadata}) == partitions


async def test_influx_line_protocol_write_then_influxql_query(settings: Settings) -> None:
    """Points written as line protocol (ms precision) are read back by InfluxQL."""
    db = unique("test_db").replace("-", "_")
    async with InfluxClient(str(settings.influx_url)) as influx:
        await influx.create_database(db)
        try:
            await influx.write(
                db,
                "thermostat,device_id=t1,site=home temperature_c=21.5,heating=true 1795680000123\n"
                "thermostat,device_id=t1,site=home temperature_c=22,heating=false 1795680001123\n",
            )
            results = await influx.query(
                "SELECT temperature_c, heating, device_id FROM thermostat ORDER BY time", db=db
            )
        finally:
            await influx.drop_database(db)
    series = results[0]["series"][0]
    assert series["columns"] == ["time", "temperature_c", "heating", "device_id"]
    assert series["values"] == [
        [1795680000123, 21.5, True, "t1"],
        [1795680001123, 22.0, False, "t1"],
    ]
