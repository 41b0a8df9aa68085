"""Records to Kafka in arrival order per partition, each message finished when Kafka has
acknowledged all of its records."""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from gateway.adapters.kafka import describe_kafka_error, is_fatal
from gateway.domain.backoff import Backoff
from gateway.domain.deadletters import Headers, dead_letter_headers
from gateway.domain.pending import held_headers
from gateway.domain.validation import READING_SCHEMA, Accepted, Held, Outcome, Presence
from gateway.errors import IotgwError
from gateway.topics import Topics

__all__ = ["KafkaPublisher", "PublishError", "PublishStats"]

log = structlog.get_logger(__name__)

RETRY_BACKOFF = Backoff(first=0.1, cap=5.0)
# One Kafka request carries up to this many bytes of one partition's records.
BATCH_BYTES = 512 * 1024
# Keys whose lane is remembered (a device's partition never changes).
_LANE_CACHE = 100_000
# The headers of a reading's record (aiokafka only reads them): its schema, and whether its
# time is the device's or, for a device that sent none, the bridge's.
_DEVICE_TIME_HEADERS: Headers = [("schema", READING_SCHEMA), ("ts_source", b"device")]
_GATEWAY_TIME_HEADERS: Headers = [("schema", READING_SCHEMA), ("ts_source", b"gateway")]


class PublishError(IotgwError):
    """Kafka refused the records for a reason retrying cannot fix."""


@dataclass
class PublishStats:
    """What the publisher did since the stats were last taken."""

    published: int = 0
    availability: int = 0
    held: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    retries: int = 0
    newest_ts: int = 0


@dataclass(eq=False, slots=True)
class _Message:
    token: int
    remaining: int


@dataclass(eq=False, slots=True)
class _Record:
    key: bytes | None
    value: bytes
    headers: Headers
    message: _Message
    outcome: Outcome


@dataclass(eq=False)
class _Lane:
    """One partition's records in arrival order; at most one batch of them with Kafka."""

    topic: str
    partition: int
    records: collections.deque[_Record] = field(default_factory=collections.deque)
    sending: int = 0  # records at the head that are in the batch Kafka has now
    failures: int = 0  # consecutive failed batches: the backoff's step
    waiting: bool = False  # backing off after a failure
    ready: bool = False  # in the publisher's ready queue


class KafkaPublisher:
    """Sends each partition's records in the order they were submitted, retrying until
    Kafka acknowledged them, and calls `on_done(token)` once a message's records all are.

    `submit` is synchronous, so records queue in arrival order. Each partition (the one
    the Java client's murmur2 partitioner picks for the key) has a lane of its own, and a
    lane hands Kafka its next batch only after the previous one was acknowledged. A
    failed batch's records stay at the lane's head and are sent again before any later
    record of that partition: a device's readings cannot overtake each other, even when
    Kafka gives up on a batch after a long outage. Records leave the lane only once Kafka
    acknowledged them, so what waits is bounded by what the caller submits.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topics: Topics,
        partitions: dict[str, list[int]],
        on_done: Callable[[int], None],
    ) -> None:
        self._producer = producer
        self._readings = topics.readings
        self._dead_letters = topics.dead_letters
        self._availability = topics.availability
        self._pending = topics.pending
        self._partitions = partitions
        self._on_done = on_done
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._ready: collections.deque[_Lane] = collections.deque()
        self._wakeup = asyncio.Event()
        self._partitioner = DefaultPartitioner()
        self._lane_of: dict[tuple[str, bytes], _Lane] = {}
        self._unkeyed = 0
        self.pending = 0  # messages submitted and not done
        # Held messages (to the pending topic) not acknowledged yet, by device; `held_settled`
        # is set each time one is.
        self.held_in_flight: collections.Counter[str] = collections.Counter()
        self.held_settled = asyncio.Event()
        self.stats = PublishStats()
        self._fatal: PublishError | None = None

    @classmethod
    async def create(
        cls, producer: AIOKafkaProducer, topics: Topics, on_done: Callable[[int], None]
    ) -> KafkaPublisher:
        """A publisher for the readings and dead-letter topics, their partitions looked up."""
        partitions = {
            topic: sorted(await producer.partitions_for(topic))
            for topic in (topics.readings, topics.dead_letters, topics.availability, topics.pending)
        }
        return cls(producer, topics, partitions, on_done)

    def take_stats(self) -> PublishStats:
        stats, self.stats = self.stats, PublishStats()
        return stats

    def submit(self, outcomes: list[Outcome], token: int) -> None:
        """Queue a message's records; `on_done(token)` once Kafka acknowledged them all."""
        if not outcomes:
            self._on_done(token)
            return
        message = _Message(token, len(outcomes))
        self.pending += 1
        key: bytes | None
        for outcome in outcomes:
            if isinstance(outcome, Accepted):
                topic, key = self._readings, outcome.device_id.encode()
                value = outcome.value
                headers = _DEVICE_TIME_HEADERS if outcome.device_time else _GATEWAY_TIME_HEADERS
            elif isinstance(outcome, Presence):
                topic, key = self._availability, outcome.device_id.encode()
                value, headers = outcome.value, []
            elif isinstance(outcome, Held):
                topic, key = self._pending, outcome.device_id.encode()
                value = outcome.original
                detail = f"device {outcome.device_id} is not registered; held for approval"
                headers = held_headers(
                    detail, outcome.mqtt_topic, outcome.received_at, outcome.source, outcome.kind
                )
                self.held_in_flight[outcome.device_id] += 1
            else:
                topic = self._dead_letters
                key = outcome.device_id.encode() if outcome.device_id else None
                value = outcome.original
                headers = dead_letter_headers(
                    outcome.reason, outcome.detail, outcome.mqtt_topic, outcome.received_at
                )
            lane = self._lane(topic, key)
            lane.records.append(_Record(key, value, headers, message, outcome))
            self._make_ready(lane)

    async def run(self) -> None:
        """Send what is ready until cancelled; PublishError when Kafka refuses for good."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._fatal is not None:
                raise self._fatal
            while self._ready:
                lane = self._ready.popleft()
                lane.ready = False
                if lane.records and not lane.sending and not lane.waiting:
                    await self._send(lane)

    def _lane(self, topic: str, key: bytes | None) -> _Lane:
        if key is not None:
            lane = self._lane_of.get((topic, key))
            if lane is not None:
                return lane
        partitions = self._partitions[topic]
        if key is None:
            self._unkeyed += 1
            partition = partitions[self._unkeyed % len(partitions)]
        else:
            partition = int(self._partitioner(key, partitions, partitions))
        lane = self._lanes.get((topic, partition))
        if lane is None:
            lane = self._lanes[(topic, partition)] = _Lane(topic, partition)
        if key is not None:
            if len(self._lane_of) >= _LANE_CACHE:
                self._lane_of.clear()
            self._lane_of[(topic, key)] = lane
        return lane

    def _make_ready(self, lane: _Lane) -> None:
        if not lane.ready and not lane.sending and not lane.waiting:
            lane.ready = True
            self._ready.append(lane)
            self._wakeup.set()

    async def _send(self, lane: _Lane) -> None:
        builder = self._producer.create_batch()
        count = 0
        for record in lane.records:
            appended = builder.append(
                timestamp=None, key=record.key, value=record.value, headers=record.headers
            )
            if appended is None:
                break
            count += 1
        if not count:
            raise RuntimeError("a record larger than an empty batch")
        lane.sending = count
        try:
            delivered = await self._producer.send_batch(
                builder, lane.topic, partition=lane.partition
            )
        except KafkaError as exc:
            # Kafka does not take the batch (down, or no metadata yet).
            self._failed(lane, exc)
            return
        delivered.add_done_callback(functools.partial(self._settle, lane))

    def _settle(self, lane: _Lane, delivered: asyncio.Future[Any]) -> None:
        if delivered.cancelled():
            self._failed(lane, None)
            return
        if (error := delivered.exception()) is not None:
            # Kafka gave up on the batch (e.g. a partition without a leader for too long).
            self._failed(lane, error)
            return
        stats = self.stats
        count, lane.sending, lane.failures = lane.sending, 0, 0
        for _ in range(count):
            record = lane.records.popleft()
            outcome = record.outcome
            if isinstance(outcome, Accepted):
                stats.published += 1
                if outcome.ts > stats.newest_ts:
                    stats.newest_ts = outcome.ts
            elif isinstance(outcome, Presence):
                stats.availability += 1
            elif isinstance(outcome, Held):
                stats.held += 1
                self._held_settled(outcome.device_id)
            else:
                stats.rejected[outcome.reason.value] += 1
            message = record.message
            message.remaining -= 1
            if not message.remaining:
                self.pending -= 1
                self._on_done(message.token)
        if lane.records:
            self._make_ready(lane)

    def _held_settled(self, device_id: str) -> None:
        left = self.held_in_flight[device_id] - 1
        if left:
            self.held_in_flight[device_id] = left
        else:
            del self.held_in_flight[device_id]
        self.held_settled.set()

    def _failed(self, lane: _Lane, exc: BaseException | None) -> None:
        """Keep the batch's records at the lane's head and send them again after a pause;
        stop the publisher if retrying cannot help."""
        error = describe_kafka_error(exc) if exc is not None else "cancelled"
        if exc is not None and is_fatal(exc, self._producer):
            self._fatal = PublishError(f"Kafka refused records for {lane.topic} for good: {error}")
            self._wakeup.set()
            return
        delay = RETRY_BACKOFF.delay(lane.failures)
        log.warning(
            "kafka_send_failed",
            topic=lane.topic,
            partition=lane.partition,
            records=lane.sending,
            error=error,
            retry_in_s=delay,
        )
        self.stats.retries += lane.sending
        lane.sending = 0
        lane.failures += 1
        lane.waiting = True
        asyncio.get_running_loop().call_later(delay, self._retry, lane)

    def _retry(self, lane: _Lane) -> None:
        lane.waiting = False
        self._make_ready(lane)
