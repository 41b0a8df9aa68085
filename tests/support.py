"""Test helpers: devices that publish over MQTT, readers of Kafka topics, a bridge to run."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaConsumer
from gmqtt import Client
from gmqtt.storage import PersistentStorage
from pydantic import SecretStr

from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import ensure_topics
from gateway.adapters.mqtt import connect, publish_in_window
from gateway.clock import now_ms
from gateway.domain.rollups import rollup_task_name
from gateway.services.bridge.session import Bridge
from gateway.services.influx_setup import setup_influx
from gateway.services.registry import RegistryWriter
from gateway.services.writer import Writer
from gateway.settings import MqttEndpoint, Settings
from schemas import Device
from tests.conftest import unique


async def until(condition: Callable[[], bool], timeout_s: float, what: str = "condition") -> None:
    """Wait until `condition()` holds; it reads state that other tasks or threads update."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.02)


def service_env(settings: Settings) -> dict[str, str]:
    """The environment of an iotgw process configured exactly like `settings`."""
    return {**os.environ, **settings.environment()}


async def own_settings(base: Settings, **overrides: Any) -> Settings:
    """Settings with this test's own topics, client id, group and database."""
    database = unique("db").replace("-", "_")
    own = base.model_copy(
        update={
            "topic_prefix": unique("t").replace("-", ""),
            "mqtt_client_id": unique("bridge"),
            "writer_group": unique("writer"),
            "influx_db": database,
            "mqtt_session_expiry_s": 300,
            "metrics_port": 0,
            # On InfluxDB 2.x the test's own bucket, mapped to a database of its name.
            **({"influx_bucket": database} if base.influx_v2 else {}),
            **overrides,
        }
    )
    await ensure_topics(own)
    async with InfluxClient.for_settings(own) as influx:
        if await influx.ping():
            await influx.create_database(own.influx_database)
    return own


async def register(settings: Settings, *devices: Device) -> None:
    async with RegistryWriter(settings) as writer:
        await writer.put(*devices)


class DevicePublisher:
    """An MQTT client that publishes QoS 1 within the broker's in-flight window.

    Leaving the context waits until the broker acknowledged every reading (PUBACK):
    only then was the device told they were received.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str | None = None,
        *,
        login: tuple[str, str] | None = None,
        ca_file: Path | None = None,
    ) -> None:
        """A device on `host:port`; with `ca_file` over TLS, with `login` (user, password)."""
        self.unacknowledged = PersistentStorage()
        self.client = Client(client_id or unique("device"), persistent_storage=self.unacknowledged)
        user, password = login or (None, None)
        self._endpoint = MqttEndpoint(
            host, port, ca_file is not None, user, SecretStr(password) if password else None
        )
        self._ca_file = ca_file

    async def __aenter__(self) -> DevicePublisher:
        await connect(self.client, self._endpoint, ca_file=self._ca_file, timeout_s=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.wait_for(self.unacknowledged.wait_empty(), 30)
        await self.client.disconnect()

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False
    ) -> None:
        await asyncio.wait_for(
            publish_in_window(self.client, topic, payload, qos, retain=retain), 30
        )


def reading_payload(
    device_type: str = "thermostat", seq: int = 0, ts: int | None = None, **metrics: Any
) -> bytes:
    values = metrics or {"temperature_c": 20.0 + seq % 10, "heating": seq % 2 == 0}
    return json.dumps(
        {"type": device_type, "ts": ts or now_ms(), "seq": seq, "metrics": values}
    ).encode()


class TopicReader:
    """Reads a topic from the beginning in the background, keeping every record."""

    def __init__(self, settings: Settings, topic: str, *, committed_only: bool = False) -> None:
        self.records: list[Any] = []
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
            isolation_level="read_committed" if committed_only else "read_uncommitted",
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


class Runnable(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...

    def readiness(self) -> dict[str, bool]: ...


S = TypeVar("S", bound=Runnable)


@asynccontextmanager
async def running(service: S) -> AsyncIterator[S]:
    """A service in this process, ready (all its parts up), stopped gracefully after."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await until(lambda: task.done() or all(service.readiness().values()), 30, "ready")
        if task.done():
            task.result()
        yield service
    finally:
        stop.set()
        await task


def running_bridge(settings: Settings) -> AbstractAsyncContextManager[Bridge]:
    return running(Bridge(settings))


def running_writer(settings: Settings) -> AbstractAsyncContextManager[Writer]:
    return running(Writer(settings))


async def influx_rows(settings: Settings, query: str) -> list[list[Any]]:
    """The rows of every series an InfluxQL query returns from the settings' database."""
    async with InfluxClient.for_settings(settings) as influx:
        return await influx.rows(query, db=settings.influx_database)


async def influx_count(settings: Settings, measurement: str, field: str = "seq") -> int:
    rows = await influx_rows(settings, f'SELECT count("{field}") FROM "{measurement}"')
    return int(rows[0][1]) if rows else 0


async def until_points(
    settings: Settings, measurement: str, count: int, timeout_s: float = 60, field: str = "seq"
) -> None:
    """Wait until InfluxDB holds `count` points of `measurement` (by a field every point has)."""
    deadline = time.monotonic() + timeout_s
    while (found := await influx_count(settings, measurement, field)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{measurement}: {found} of {count} points in InfluxDB")
        await asyncio.sleep(0.2)


def canonical(device_id: str, device_type: str, seq: int, ts: int, **metrics: Any) -> bytes:
    return json.dumps(
        {
            "device_id": device_id,
            "type": device_type,
            "ts": ts,
            "seq": seq,
            "metrics": metrics,
            "received_at": ts + 5,
        }
    ).encode()


async def forget_session(settings: Settings) -> None:
    """Delete the bridge's persistent session, so the broker stops queueing for it."""
    client = Client(settings.mqtt_client_id, clean_session=True, session_expiry_interval=0)
    await connect(client, settings.mqtt, ca_file=settings.mqtt_ca_file, timeout_s=10)
    await client.disconnect()


# A user-defined device type (DESIGN.md, "Device sources"), as a types file holds it.
SOIL_PROBE_TYPES = """\
types:
  - name: soil_probe
    metrics:
      - {name: moisture, unit: pct, kind: float, min: 0, max: 100}
      - {name: temperature, unit: c, kind: float, min: -40, max: 85}
      - {name: leak, kind: bool}
      - {name: tips, kind: int, min: 0}
"""


def quiet(_: str) -> None:
    """A progress report nobody reads."""


@asynccontextmanager
async def set_up(settings: Settings) -> AsyncIterator[Settings]:
    """`settings`' InfluxDB set up by `iotgw influx setup` (retention, rollups); the
    database or bucket and its rollups removed afterwards, so they stop running (a 2.x task
    outlives its bucket)."""
    await setup_influx(settings, quiet)
    try:
        yield settings
    finally:
        async with InfluxClient.for_settings(settings) as influx:
            if influx.v2:
                await influx.delete_task(rollup_task_name(settings.influx_database))
            await influx.drop_database(settings.influx_database)


async def mixed_home_settings(base: Settings, folder: Path) -> tuple[Settings, str]:
    """This test's own settings (as `own_settings`, writer flushing every 0.2 s) with a
    sources file of Zigbee2MQTT (on a base topic of its own: no other test's devices),
    Tasmota and Shelly in `folder`; and that base topic."""
    base_topic = unique("z2m")
    sources = folder / "sources.yaml"
    sources.write_text(
        f"sources:\n  - adapter: zigbee2mqtt\n    base_topic: {base_topic}\n"
        "  - adapter: tasmota\n  - adapter: shelly\n"
    )
    return await own_settings(base, writer_flush_interval_s=0.2, sources_file=sources), base_topic
