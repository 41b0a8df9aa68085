"""Test helpers: devices that publish over MQTT, readers of Kafka topics, a bridge to run."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from aiokafka import AIOKafkaConsumer
from gmqtt import Client
from gmqtt.storage import PersistentStorage

from gateway.bridge import Bridge
from gateway.kafka import ensure_topics
from gateway.registry import RegistryWriter
from gateway.settings import Settings
from schemas import Device
from tests.conftest import unique


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def until(condition: Callable[[], bool], timeout_s: float, what: str = "condition") -> None:
    """Wait until `condition()` holds; it reads state that other tasks or threads update."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


async def own_settings(base: Settings, **overrides: Any) -> Settings:
    """Settings with this test's own topics, share group and bridge client id."""
    own = base.model_copy(
        update={
            "topic_prefix": unique("t").replace("-", ""),
            "mqtt_share_group": unique("g"),
            "mqtt_client_id": unique("bridge"),
            "mqtt_session_expiry_s": 300,
            "metrics_port": 0,
            **overrides,
        }
    )
    await ensure_topics(own)
    return own


async def register(settings: Settings, *devices: Device) -> None:
    async with RegistryWriter(settings) as writer:
        await writer.put(*devices)


class DevicePublisher:
    """An MQTT client that publishes QoS 1 within the broker's in-flight window.

    Leaving the context waits until the broker acknowledged every reading (PUBACK):
    only then was the device told they were received.
    """

    def __init__(self, host: str, port: int, client_id: str | None = None) -> None:
        self.unacknowledged = PersistentStorage()
        self.client = Client(client_id or unique("device"), persistent_storage=self.unacknowledged)
        self._host, self._port = host, port

    async def __aenter__(self) -> DevicePublisher:
        await self.client.connect(self._host, self._port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.wait_for(self.unacknowledged.wait_empty(), 30)
        await self.client.disconnect()

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        async with asyncio.timeout(30):
            while True:
                try:
                    self.client.publish(topic, payload, qos=qos)
                    return
                except OverflowError:  # every packet id in flight: wait for PUBACKs
                    await asyncio.sleep(0.002)


def reading_payload(
    device_type: str = "thermostat", seq: int = 0, ts: int | None = None, **metrics: Any
) -> bytes:
    values = metrics or {"temperature_c": 20.0 + seq % 10, "heating": seq % 2 == 0}
    return json.dumps(
        {"type": device_type, "ts": ts or now_ms(), "seq": seq, "metrics": values}
    ).encode()


class TopicReader:
    """Reads a topic from the beginning in the background, keeping every record."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.records: list[Any] = []
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                self.records.extend(batch)

    def values(self) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.records]

    async def wait_for(self, count: int, timeout_s: float = 60) -> None:
        await until(lambda: len(self.records) >= count, timeout_s, f"{count} records")


@asynccontextmanager
async def running_bridge(settings: Settings) -> AsyncIterator[Bridge]:
    """A bridge in this process, ready (MQTT, Kafka, registry), stopped gracefully after."""
    bridge = Bridge(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await until(lambda: task.done() or all(bridge.readiness().values()), 30, "bridge ready")
        if task.done():
            task.result()
        yield bridge
    finally:
        stop.set()
        await task


async def forget_session(settings: Settings) -> None:
    """Delete the bridge's persistent session, so the broker stops queueing for it."""
    client = Client(settings.mqtt_client_id, clean_session=True, session_expiry_interval=0)
    endpoint = settings.mqtt
    await client.connect(endpoint.host, endpoint.port)
    await client.disconnect()
