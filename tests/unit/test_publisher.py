"""The publisher's lanes: each partition's records in order, one batch at a time, a failed
batch sent again before anything later of its partition (with a fake producer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from gateway.domain.deadletters import Reason
from gateway.domain.validation import Accepted, Outcome, Rejected
from gateway.services.bridge.publisher import KafkaPublisher, PublishError
from gateway.topics import Topics

pytestmark = pytest.mark.unit

TOPICS = Topics("t")


@dataclass
class Builder:
    records: list[bytes] = field(default_factory=list)
    capacity: int = 3

    def append(self, *, timestamp: None, key: bytes | None, value: bytes, headers: Any) -> Any:
        if len(self.records) == self.capacity:
            return None
        self.records.append(value)
        return object()


@dataclass
class Sent:
    topic: str
    partition: int
    values: list[bytes]
    delivered: asyncio.Future[None]


class FakeProducer:
    """Hands out batches of three; the test decides when and how each is acknowledged."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.arrived = asyncio.Event()

    def create_batch(self) -> Builder:
        return Builder()

    async def send_batch(self, batch: Builder, topic: str, *, partition: int) -> Any:
        delivered = asyncio.get_running_loop().create_future()
        self.sent.append(Sent(topic, partition, list(batch.records), delivered))
        self.arrived.set()
        return delivered

    async def next_batch(self, count: int) -> Sent:
        while len(self.sent) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)
        return self.sent[count - 1]


def reading(device: str, n: int) -> Accepted:
    return Accepted(device, f"{device}-{n}".encode(), n)


def dead_letter(device: str | None, n: int) -> Rejected:
    return Rejected(device, Reason.SCHEMA, "bad", f"bad-{n}".encode(), "devices/x/telemetry", 0)


@asynccontextmanager
async def publishing(
    outcomes: list[list[Outcome]],
) -> AsyncIterator[tuple[FakeProducer, list[int]]]:
    """A publisher on a fake producer, the messages submitted (token = position), running."""
    producer = FakeProducer()
    done: list[int] = []
    publisher = KafkaPublisher(
        producer,
        TOPICS,
        {TOPICS.readings: [0], TOPICS.dead_letters: [0, 1]},
        done.append,
    )
    for token, message in enumerate(outcomes):
        publisher.submit(message, token)
    running = asyncio.create_task(publisher.run())
    try:
        yield producer, done
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_partition_has_one_batch_with_kafka_at_a_time() -> None:
    """Seven readings of one partition: batches of three, the next only after the last
    was acknowledged; messages finish in order."""
    async with publishing([[reading("a", n)] for n in range(7)]) as (producer, done):
        first = await producer.next_batch(1)
        assert first.values == [b"a-0", b"a-1", b"a-2"]
        await asyncio.sleep(0)
        assert len(producer.sent) == 1
        first.delivered.set_result(None)
        second = await producer.next_batch(2)
        assert second.values == [b"a-3", b"a-4", b"a-5"]
        assert done == [0, 1, 2]


async def test_a_failed_batch_goes_again_before_later_records_of_its_partition() -> None:
    """Kafka gives up on a batch: the same records, in the same order, are the next batch
    of that partition; nothing later overtakes them, and nothing is finished twice."""
    async with publishing([[reading("a", n)] for n in range(5)]) as (producer, done):
        first = await producer.next_batch(1)
        first.delivered.set_exception(KafkaTimeoutError())
        again = await producer.next_batch(2)
        assert again.values == [b"a-0", b"a-1", b"a-2"]
        assert done == []
        again.delivered.set_result(None)
        rest = await producer.next_batch(3)
        assert rest.values == [b"a-3", b"a-4"]
        rest.delivered.set_result(None)
        await asyncio.sleep(0)
        assert done == [0, 1, 2, 3, 4]


async def test_a_message_finishes_when_all_its_records_are_acknowledged() -> None:
    """A batch message with a reading and two dead letters (other topic, round-robin over
    its partitions) finishes only when all three partitions acknowledged."""
    message: list[Outcome] = [reading("a", 0), dead_letter(None, 1), dead_letter(None, 2)]
    async with publishing([message]) as (producer, done):
        batches = [await producer.next_batch(n) for n in (1, 2, 3)]
        assert sorted((b.topic, b.partition) for b in batches) == [
            (TOPICS.readings, 0), (TOPICS.dead_letters, 0), (TOPICS.dead_letters, 1),
        ]  # fmt: skip
        for batch in batches[:2]:
            batch.delivered.set_result(None)
        await asyncio.sleep(0)
        assert done == []
        batches[2].delivered.set_result(None)
        await asyncio.sleep(0)
        assert done == [0]


async def test_an_error_retrying_cannot_fix_stops_the_publisher() -> None:
    """Kafka refuses the topic (not authorized): the publisher stops with a reason
    instead of retrying forever, and nothing is reported done."""
    producer, done = FakeProducer(), list[int]()

    async def refused(batch: Builder, topic: str, *, partition: int) -> Any:
        raise TopicAuthorizationFailedError()

    producer.send_batch = refused  # type: ignore[method-assign]
    publisher = KafkaPublisher(producer, TOPICS, {TOPICS.readings: [0]}, done.append)
    publisher.submit([reading("a", 0)], 0)
    with pytest.raises(PublishError, match="for good"):
        await asyncio.wait_for(publisher.run(), 5)
    assert done == []
