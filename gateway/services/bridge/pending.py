"""A bridge worker's pending devices: held messages replayed on approval, or dead letters.

The worker holds the messages of unknown devices in `iot.readings.pending` (see
gateway/domain/pending.py) and, because it alone receives its devices' messages in the
order they came, it alone may end a device's wait:

- **approved** (the device is in the registry: `iotgw devices approve`, or registered by
  the bridge itself for a source with `auto_approve`): its held messages are judged again
  and go to `iot.readings` (or the dead-letter topic) in the order they came, through the
  worker's publisher. New messages of the device keep being held meanwhile. For the last
  stretch the worker keeps the device's new messages aside in memory (unacknowledged, so
  nothing is lost if it dies), waits until every held one is in Kafka, replays the rest
  of the topic, writes the `approved` record, and only then hands the kept messages to
  validation: they reach the device's partition after every held one.
- **expired**: held messages older than IOTGW_PENDING_MAX_AGE_S become `unknown_device`
  dead letters.
- **denied** (`iotgw devices deny`, which writes the dead letters and the `denied` record
  itself): read from the topic like everything else.

A replayed message is acknowledged by Kafka before the record that says it was replayed:
a worker that dies between the two replays it again (at least once, as everywhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from gateway.adapters.kafka import (
    create_consumer,
    describe_kafka_error,
    is_fatal,
    read_to_end,
    read_topic,
    topic_partitions,
)
from gateway.clock import now_ms
from gateway.domain.deadletters import Reason
from gateway.domain.pending import HELD, PendingBook, Resolution, resolution_record
from gateway.domain.validation import Outcome, ReadingValidator, Rejected
from gateway.errors import IotgwError
from gateway.services.bridge.publisher import KafkaPublisher
from gateway.services.registry import DeviceRegistry
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device

__all__ = ["PendingDevices", "Queued", "held_messages", "pending_partition", "read_pending"]

log = structlog.get_logger(__name__)

_PARTITIONER = DefaultPartitioner()
# A message kept aside while its device's last held ones are replayed:
# (index, topic, payload, size, received_at).
Queued = tuple[int, str, bytes, int, int]
# How often held devices are looked at (approved? expired?), and how long one fetch of the
# pending topic waits: together they bound how late an approval starts.
_TICK_S = 0.5
_FOLLOW_WAIT_MS = 200
# Devices whose wait is being ended at once (each reads the topic with a consumer of its
# own), and replayed messages in Kafka's hands at once (each holds its bytes).
_AT_ONCE = 4
_REPLAY_WINDOW = 1000


class PendingDevices:
    """The pending devices one worker owns, and what ends their wait."""

    def __init__(
        self,
        settings: Settings,
        owned: Callable[[str], bool],
        validator: ReadingValidator,
        registry: DeviceRegistry,
        producer: AIOKafkaProducer,
        publisher: KafkaPublisher,
        auto_approving: frozenset[str],
        resubmit: Callable[[list[Queued]], None],
    ) -> None:
        assert validator.pending is not None
        self.book: PendingBook = validator.pending
        self._settings = settings
        self._owned = owned
        self._validator = validator
        self._registry = registry
        self._producer = producer
        self._publisher = publisher
        self._auto_approving = auto_approving
        self._resubmit = resubmit
        self._topics = Topics(settings.topic_prefix)
        self._partitions: list[int] = []
        self._max_age_ms = int(settings.pending_max_age_s * 1000)
        # Held messages expire in steps: a device that keeps sending past the maximum age
        # is not read again for each message that comes of age.
        self._expiry_step_ms = min(60_000, self._max_age_ms // 100)
        # Devices whose new messages are kept aside, with those messages in arrival order.
        self.draining: dict[str, list[Queued]] = {}
        self._busy: set[str] = set()
        self._registering: set[str] = set()
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._work: set[asyncio.Task[None]] = set()
        # Replays in flight: their messages' (negative) tokens, done when Kafka has them all.
        self._next_token = -1
        self._waiting: dict[int, asyncio.Future[None]] = {}

    async def start(self) -> None:
        """Read the pending topic to its end (the devices this worker owns), then follow it."""
        settings = self._settings
        topic = self._topics.pending
        self._partitions = await topic_partitions(settings, topic)
        self._consumer = consumer = create_consumer(
            settings,
            request_timeout_ms=int(settings.timeout_s * 1000),
            fetch_max_wait_ms=_FOLLOW_WAIT_MS,
        )
        try:
            await asyncio.wait_for(consumer.start(), settings.timeout_s)
            partitions = [TopicPartition(topic, p) for p in self._partitions]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            await read_to_end(consumer, self._apply, idle_timeout_s=settings.timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            await self.stop()
            raise IotgwError(
                f"cannot read the pending devices ({topic}): {describe_kafka_error(exc)}"
            ) from None
        self._tasks = [
            asyncio.create_task(self._follow(consumer), name="pending-follow"),
            asyncio.create_task(self._look(), name="pending-look"),
        ]

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """Following the topic and ending waits: either ending means it failed."""
        return list(self._tasks)

    async def stop(self) -> None:
        for task in [*self._tasks, *self._work]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._work, return_exceptions=True)
        self._tasks = []
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    def finished(self, token: int) -> None:
        """The publisher has a replayed message's records acknowledged (a negative token)."""
        waiting = self._waiting.pop(token, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _apply(self, records: list[Any]) -> None:
        for record in records:
            key = record.key
            if key is not None and self._owned(key.decode(errors="replace")):
                self.book.apply(record.offset, key, record.headers, record.value)

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                if is_fatal(exc):
                    raise IotgwError(
                        f"cannot follow the pending devices: {describe_kafka_error(exc)}"
                    ) from None
                log.warning("pending_fetch_failed", error=describe_kafka_error(exc))
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                self._apply(records)

    async def _look(self) -> None:
        """Start what ends each held device's wait, as it becomes due (a few at a time)."""
        while True:
            now = now_ms()
            for device in list(self.book.devices.values()):
                device_id = device.device_id
                if len(self._busy) >= _AT_ONCE:
                    break
                if device_id in self._busy or device.since is None:
                    continue
                if self._registry.get(device_id) is not None:
                    self._registering.discard(device_id)
                    self._start(device_id, self._approve(device_id))
                elif device.first_seen < now - self._max_age_ms - self._expiry_step_ms:
                    self._start(device_id, self._expire(device_id))
                elif (
                    device.source in self._auto_approving
                    and device.type is not None
                    and device_id not in self._registering
                ):
                    self._registering.add(device_id)
                    self._start(device_id, self._register(device_id, device.type))
            await asyncio.sleep(_TICK_S)

    def _start(self, device_id: str, work: Coroutine[Any, Any, None]) -> None:
        self._busy.add(device_id)
        task = asyncio.create_task(work, name=f"pending-{device_id}")
        self._work.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._work.discard(task)
            self._busy.discard(device_id)
            if not task.cancelled() and (error := task.exception()) is not None:
                # Kafka trouble: the device stays pending and is looked at again.
                log.warning("pending_work_failed", device_id=device_id, error=str(error))

        task.add_done_callback(done)

    def _partition(self, device_id: str) -> TopicPartition:
        return pending_partition(self._topics.pending, self._partitions, device_id)

    async def _approve(self, device_id: str) -> None:
        """Replay a registered device's held messages, then let its new ones through."""
        started = time.monotonic()
        tp = self._partition(device_id)
        device = self.book.devices[device_id]
        assert device.since is not None
        self.book.pinned.add(device_id)
        try:
            position, replayed = await self._replay(device_id, tp, device.since)
            self.draining[device_id] = []
            try:
                # Not for long: every message after the kept ones waits for its PUBACK.
                await asyncio.wait_for(self._held_in_kafka(device_id), self._settings.timeout_s)
                position, more = await self._replay(device_id, tp, position)
                replayed += more
                await self._resolve(
                    device_id, Resolution.APPROVED, position - 1, replayed, final=True
                )
            finally:
                self._resubmit(self.draining.pop(device_id))
        finally:
            self.book.pinned.discard(device_id)
        log.info(
            "pending_device_approved",
            device_id=device_id,
            replayed=replayed,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _held_in_kafka(self, device_id: str) -> None:
        """Until Kafka has every message of the device held so far."""
        publisher = self._publisher
        while publisher.held_in_flight.get(device_id):
            publisher.held_settled.clear()
            await publisher.held_settled.wait()

    async def _expire(self, device_id: str) -> None:
        """Dead-letter a device's held messages older than the maximum age."""
        tp = self._partition(device_id)
        device = self.book.devices[device_id]
        assert device.since is not None
        cutoff = now_ms() - self._max_age_ms
        age = f"{self._settings.pending_max_age_s:g} s"
        detail = f"device {device_id} was not approved within {age} (IOTGW_PENDING_MAX_AGE_S)"
        expired, through, first_remaining = 0, -1, None
        tokens: list[asyncio.Future[None]] = []
        end = await self._end(tp)
        held = held_messages(self._settings, device_id, tp, device.since, end)
        async for offset, topic, payload, received_at in held:
            if received_at >= cutoff:
                first_remaining = received_at
                break
            letter = Rejected(device_id, Reason.UNKNOWN_DEVICE, detail, payload, topic, received_at)
            tokens.append(self._submit([letter]))
            expired, through = expired + 1, offset
            if len(tokens) >= _REPLAY_WINDOW:
                await asyncio.gather(*tokens)
                tokens = []
        await asyncio.gather(*tokens)
        if expired:
            await self._resolve(device_id, Resolution.EXPIRED, through, expired, first_remaining)
            log.info("pending_readings_expired", device_id=device_id, expired=expired)
        elif first_remaining is not None:
            device.first_seen = first_remaining

    async def _register(self, device_id: str, kind: str) -> None:
        """Register a device of an auto-approving source: approval follows from the registry."""
        device = Device(device_id=device_id, type=kind, registered_at=now_ms())
        try:
            await self._producer.send_and_wait(
                self._topics.devices, device.model_dump_json().encode(), key=device_id.encode()
            )
        except BaseException:
            self._registering.discard(device_id)  # tried again at the next look
            raise
        log.info("pending_device_auto_approved", device_id=device_id, type=kind)

    async def _replay(self, device_id: str, tp: TopicPartition, start: int) -> tuple[int, int]:
        """Judge again and publish the device's held messages from `start` to the end of the
        partition now, and wait until Kafka has them; that end, and how many were replayed."""
        end = await self._end(tp)
        tokens = [
            self._submit(self._validator.replay(topic, payload, received_at))
            async for _, topic, payload, received_at in held_messages(
                self._settings, device_id, tp, start, end
            )
        ]
        await asyncio.gather(*tokens)
        return max(start, end), len(tokens)

    def _submit(self, outcomes: list[Outcome]) -> asyncio.Future[None]:
        token, self._next_token = self._next_token, self._next_token - 1
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = waiting
        self._publisher.submit(outcomes, token)
        return waiting

    async def _resolve(
        self,
        device_id: str,
        resolution: Resolution,
        through: int,
        count: int,
        first_remaining: int | None = None,
        *,
        final: bool = False,
    ) -> None:
        value, headers = resolution_record(resolution, through, count, first_remaining)
        await self._producer.send_and_wait(
            self._topics.pending, value, key=device_id.encode(), headers=headers
        )
        self.book.resolve(device_id, through, count, first_remaining, final=final)

    async def _end(self, tp: TopicPartition) -> int:
        assert self._consumer is not None
        ends: dict[TopicPartition, int] = await self._consumer.end_offsets([tp])
        return ends[tp]


async def read_pending(settings: Settings) -> PendingBook:
    """Every pending device, from the whole pending topic."""
    book = PendingBook()

    def apply(records: list[Any]) -> None:
        for record in records:
            book.apply(record.offset, record.key, record.headers, record.value)

    await read_topic(settings, Topics(settings.topic_prefix).pending, apply)
    return book


def pending_partition(topic: str, partitions: list[int], device_id: str) -> TopicPartition:
    """The partition of the pending topic a device's records are in (the producer's choice)."""
    partition = _PARTITIONER(device_id.encode(), partitions, partitions)
    return TopicPartition(topic, int(partition))


async def held_messages(
    settings: Settings, device_id: str, tp: TopicPartition, start: int, end: int
) -> AsyncIterator[tuple[int, str, bytes, int]]:
    """The device's held messages in `tp` from offset `start` to `end`, in order:
    (offset, MQTT topic, payload, received_at)."""
    key = device_id.encode()
    if start >= end:
        return
    consumer = create_consumer(settings)
    try:
        await asyncio.wait_for(consumer.start(), settings.timeout_s)
        consumer.assign([tp])
        consumer.seek(tp, start)
        while (position := await consumer.position(tp)) < end:
            batches = await consumer.getmany(
                tp, timeout_ms=int(settings.timeout_s * 1000), max_records=1000
            )
            records = batches.get(tp, [])
            if not records and await consumer.position(tp) == position:
                raise IotgwError(f"the pending topic gave nothing past offset {position}")
            for record in records:
                if record.offset >= end:
                    return
                said: dict[str, bytes] = dict(record.headers or ())
                if record.key != key or said.get("pending") != HELD:
                    continue
                topic = said.get("mqtt_topic", b"").decode(errors="replace")
                received_at = int(said.get("received_at", b"0"))
                yield record.offset, topic, record.value or b"", received_at
    finally:
        with contextlib.suppress(KafkaError):
            await consumer.stop()
