"""The device registry: a live, in-memory view of the compacted topic `iot.devices`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from gateway.adapters.kafka import (
    create_consumer,
    create_producer,
    describe_kafka_error,
    is_fatal,
    read_to_end,
    started,
    topic_partitions,
)
from gateway.errors import IotgwError
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device

__all__ = ["DeviceRegistry", "RegistryWriter"]

log = structlog.get_logger(__name__)

# How long one fetch waits for new registry records: bounds how late a live registry
# sees a change (DESIGN: a registration is visible within a second).
_FOLLOW_WAIT_MS = 200


class DeviceRegistry:
    """Every registered device by id, loaded from `iot.devices` and kept live.

    `start()` reads the topic from the beginning to its end offsets and only then
    returns (and sets `ready`), so a gateway never rejects a registered device because
    it started early; afterwards a background task applies new records as they come.
    Lookups are dict lookups. A record with no value (a tombstone) removes its device.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topic = Topics(settings.topic_prefix).devices
        self._devices: dict[str, Device] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[Device]:
        return iter(list(self._devices.values()))

    async def start(self) -> None:
        """Load the whole registry, then follow it; IotgwError if Kafka does not answer."""
        if self._consumer is not None:
            return
        timeout_s = self._settings.timeout_s
        self._consumer = consumer = create_consumer(
            self._settings,
            request_timeout_ms=int(timeout_s * 1000),
            fetch_max_wait_ms=_FOLLOW_WAIT_MS,
        )
        try:
            ids = await topic_partitions(self._settings, self._topic)
            partitions = [TopicPartition(self._topic, p) for p in ids]
            await asyncio.wait_for(consumer.start(), timeout_s)
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            await read_to_end(consumer, self._apply_all, idle_timeout_s=timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            await self.stop()
            raise IotgwError(
                f"cannot read the device registry from Kafka at "
                f"{self._settings.kafka_bootstrap}: {describe_kafka_error(exc)}"
            ) from None
        except BaseException:
            await self.stop()
            raise
        self.ready.set()
        self._follower = asyncio.create_task(self._follow(consumer), name="registry-follow")

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                if is_fatal(exc):
                    # Say so, and stop being ready: the service's /readyz turns 503.
                    log.error("registry_stopped", error=describe_kafka_error(exc))
                    self.ready.clear()
                    return
                # The consumer reconnects by itself; the registry keeps its last view.
                log.warning("registry_fetch_failed", error=describe_kafka_error(exc))
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                self._apply_all(records)

    def _apply_all(self, records: list[Any]) -> None:
        for record in records:
            self._apply(record.key, record.value)

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            log.warning("registry_record_without_key")
            return
        device_id = key.decode(errors="replace")
        if value is None:
            self._devices.pop(device_id, None)
            return
        try:
            device = Device.model_validate_json(value)
        except ValidationError as exc:
            log.warning("registry_record_invalid", device_id=device_id, errors=exc.error_count())
            return
        if device.device_id != device_id:
            log.warning("registry_key_mismatch", key=device_id, device_id=device.device_id)
            return
        self._devices[device_id] = device

    async def stop(self) -> None:
        """Stop following; safe to call twice."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()


class RegistryWriter:
    """Writes device records and tombstones to `iot.devices`, each acknowledged by Kafka."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topic = Topics(settings.topic_prefix).devices
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> Self:
        self._producer = await started(create_producer(self._settings), self._settings)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def put(self, *devices: Device) -> None:
        """Write devices (a new registration or an update) and wait for Kafka's acks."""
        await self._send([(d.device_id, d.model_dump_json().encode()) for d in devices])

    async def remove(self, device_id: str) -> None:
        """Write the tombstone that removes a device."""
        await self._send([(device_id, None)])

    async def _send(self, records: list[tuple[str, bytes | None]]) -> None:
        if self._producer is None:
            raise RuntimeError("RegistryWriter used outside `async with`")
        try:
            futures = [
                await self._producer.send(self._topic, value, key=key.encode())
                for key, value in records
            ]
            await asyncio.wait_for(asyncio.gather(*futures), self._settings.timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise IotgwError(
                f"writing to {self._topic} failed: {describe_kafka_error(exc)}"
            ) from None
