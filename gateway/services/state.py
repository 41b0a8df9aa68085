"""`iotgw run state`: each device's last-known state in `iot.devices.state`, merged from
`iot.readings` and `iot.availability`; reading it, and rebuilding it from scratch."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import IllegalStateError, KafkaError

from gateway.adapters.kafka import (
    consumer_lag,
    create_consumer,
    create_producer,
    describe_kafka_error,
    is_fatal,
    produce,
    read_topic,
    settings_admin,
    started,
    topic_partitions,
)
from gateway.domain.backoff import Backoff
from gateway.domain.records import DeviceState
from gateway.domain.rules import decode_availability, decode_reading
from gateway.domain.state import DeviceStates, decode_state
from gateway.errors import IotgwError
from gateway.services.runtime import HealthServer, StateMetrics
from gateway.settings import Settings
from gateway.topics import Topics

__all__ = ["Rebuilt", "StateService", "read_states", "rebuild_states"]

log = structlog.get_logger(__name__)

_BACKOFF = Backoff(first=0.5, cap=15.0)
# Records merged (and their states written, offsets committed) together at most: a
# backlog writes each device's state once for many of its readings.
_MAX_BATCH = 10_000


def encode_state(state: DeviceState) -> bytes:
    return json.dumps(state).encode()


async def read_states(settings: Settings) -> dict[str, DeviceState]:
    """Every device's state: the compacted topic read to its end; IotgwError if Kafka is away."""
    topic = Topics(settings.topic_prefix).devices_state
    states: dict[str, DeviceState] = {}

    def apply(records: list[Any]) -> None:
        for record in records:
            if record.key is None:
                continue
            device_id = record.key.decode(errors="replace")
            if record.value is None:
                states.pop(device_id, None)
                continue
            try:
                states[device_id] = decode_state(record.value)
            except ValueError as exc:
                log.warning("state_record_invalid", device_id=device_id, error=str(exc))

    try:
        await read_topic(settings, topic, apply)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise IotgwError(
            f"cannot read {topic} from Kafka at {settings.kafka_bootstrap}: "
            f"{describe_kafka_error(exc)}"
        ) from None
    return states


@dataclass(frozen=True)
class Rebuilt:
    """What a rebuild read and wrote."""

    devices: int
    readings: int
    availability: int
    skipped: int


class _Merger:
    """Merges records of `iot.readings` and `iot.availability` into `states`, counting."""

    def __init__(self, topics: Topics, states: DeviceStates) -> None:
        self.states = states
        self.counts = {"readings": 0, "availability": 0, "skipped": 0}
        self._readings = topics.readings

    def merge(self, topic: str, records: Iterable[Any]) -> None:
        readings = topic == self._readings
        kind = "readings" if readings else "availability"
        for record in records:
            try:
                if readings:
                    self.states.reading(decode_reading(record.value))
                else:
                    self.states.availability(decode_availability(record.value))
            except ValueError as exc:
                self.counts["skipped"] += 1
                log.warning("state_record_skipped", topic=topic, offset=record.offset, error=exc)
                continue
            self.counts[kind] += 1


async def rebuild_states(settings: Settings) -> Rebuilt:
    """Merge `iot.readings` and `iot.availability` from their beginning into new states and
    write them; refused while a state service runs (it would write over them)."""
    topics = Topics(settings.topic_prefix)
    await _refuse_while_running(settings)
    merger = _Merger(topics, DeviceStates())
    try:
        for topic in (topics.readings, topics.availability):
            await read_topic(settings, topic, functools.partial(merger.merge, topic))
        states = merger.states.take_changed()
        await produce(
            settings,
            topics.devices_state,
            [(device_id.encode(), encode_state(state)) for device_id, state in states.items()],
        )
    except (KafkaError, OSError, TimeoutError) as exc:
        raise IotgwError(
            f"rebuilding {topics.devices_state} failed: {describe_kafka_error(exc)}"
        ) from None
    return Rebuilt(len(states), **merger.counts)


async def _refuse_while_running(settings: Settings) -> None:
    group = settings.state_group
    async with settings_admin(settings) as admin:
        try:
            described = await asyncio.wait_for(
                admin.describe_consumer_groups([group]), settings.timeout_s
            )
        except (KafkaError, TimeoutError) as exc:
            raise IotgwError(
                f"cannot describe the group {group}: {describe_kafka_error(exc)}"
            ) from None
    members = sum(len(g[5]) for response in described for g in response.groups)
    if members:
        raise IotgwError(
            f"`iotgw run state` is running ({members} member(s) in the group {group}): "
            "stop it first, it would write over the rebuilt state"
        )


class _Stopped(Exception):  # noqa: N818 - control flow
    """Shutdown was asked for while Kafka did not take the states; they are not committed."""


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: StateService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._service.revoked()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._service.assigned(assigned)


class StateService:
    """`iotgw run state`: consumer group `iotgw-state` on iot.readings and iot.availability,
    each device's merged state to the compacted topic iot.devices.state.

    Restart safety: a batch's changed states are written and acknowledged by Kafka before
    its offsets are committed, so a kill -9 loses nothing; what it had not committed is
    merged again, which changes nothing (domain/state.py). On each assignment the service
    reads the state topic to its end before merging: a restart, or partitions taken over
    from another instance, continue from what was written. A device's readings and
    availability are in the same partition number of both topics (key = device id, same
    partition count), and the range assignor gives both to the same instance.
    """

    def __init__(self, settings: Settings, metrics: StateMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or StateMetrics()
        self.topics = Topics(settings.topic_prefix)
        self.merger = _Merger(self.topics, DeviceStates())
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        # Held while a batch is merged, written and committed, and while the states are
        # loaded: a rebalance waits for the one, the next batch for the other.
        self._lock = asyncio.Lock()
        self._assignments = 0  # counts rebalances: a batch fetched before one is fetched again
        self._loaded = False  # the states of the current assignment are loaded
        self._stop = asyncio.Event()
        self.health: HealthServer | None = None

    def readiness(self) -> dict[str, bool]:
        return {"kafka": self._consumer is not None, "state": self._loaded}

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self.health = HealthServer.start_for(
            self.settings, "state", self.metrics.registry, self.readiness
        )
        try:
            await self._check_partitions()
            self._producer = await started(create_producer(self.settings), self.settings)
            self._consumer = await started(
                create_consumer(
                    self.settings,
                    group_id=self.settings.state_group,
                    partition_assignment_strategy=(RangePartitionAssignor,),
                ),
                self.settings,
            )
            self._consumer.subscribe(
                [self.topics.readings, self.topics.availability], listener=_Rebalance(self)
            )
            log.info(
                "state_started",
                group=self.settings.state_group,
                topic=self.topics.devices_state,
                metrics=f"http://{self.settings.metrics_host}:{self.health.port}/metrics",
            )
            await self._consume(self._consumer, stop)
        except _Stopped:
            log.warning("stopped_while_kafka_failing", note="uncommitted records are merged again")
        finally:
            await self._shutdown()

    async def _check_partitions(self) -> None:
        """The topics exist, and a device's readings and availability have one partition number."""
        await topic_partitions(self.settings, self.topics.devices_state)
        readings = await topic_partitions(self.settings, self.topics.readings)
        availability = await topic_partitions(self.settings, self.topics.availability)
        if len(readings) != len(availability):
            raise IotgwError(
                f"{self.topics.readings} has {len(readings)} partitions and "
                f"{self.topics.availability} {len(availability)}: give them the same count, "
                "so a device's readings and availability reach the same state service"
            )

    async def revoked(self) -> None:
        """Before partitions go to another instance: finish the batch being written."""
        self._assignments += 1
        self._loaded = False
        async with self._lock:
            pass

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """Load every state written so far, before merging the assigned partitions."""
        self._assignments += 1
        async with self._lock:
            for attempt in itertools.count():
                try:
                    states = await read_states(self.settings) if assigned else {}
                    break
                except IotgwError as exc:
                    if self._stop.is_set():
                        return
                    delay = _BACKOFF.delay(attempt)
                    log.warning("state_load_failed", error=str(exc), retry_in_s=delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
            self.merger.states = DeviceStates(states)
            self.metrics.devices.set(len(states))
            self._loaded = True
            log.info("state_loaded", devices=len(states), partitions=len(assigned))

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            assignments = self._assignments
            batches = await consumer.getmany(timeout_ms=1000, max_records=_MAX_BATCH)
            async with self._lock:
                if assignments != self._assignments or not self._loaded:
                    _rewind(consumer, batches)
                    continue
                if batches:
                    await self._merge(consumer, batches)
            self.metrics.lag.set(await consumer_lag(consumer))

    async def _merge(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]
    ) -> None:
        """Merge a batch, write the states it changed, then commit its offsets."""
        counts = dict(self.merger.counts)
        offsets = {}
        for tp, records in batches.items():
            self.merger.merge(tp.topic, records)
            offsets[tp] = records[-1].offset + 1
        for kind in ("readings", "availability"):
            self.metrics.merged.labels(kind).inc(self.merger.counts[kind] - counts[kind])
        self.metrics.skipped.inc(self.merger.counts["skipped"] - counts["skipped"])
        changed = self.merger.states.take_changed()
        await self._write(changed)
        self.metrics.devices.set(len(self.merger.states))
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            if is_fatal(exc):
                raise
            # Another instance took the partitions: it merges them again from the last
            # commit, over the states written here, which changes nothing.
            log.warning("commit_failed", error=describe_kafka_error(exc))

    async def _write(self, states: dict[str, DeviceState]) -> None:
        """Write `states` until Kafka acknowledged them all, retrying while it fails."""
        producer = self._producer
        assert producer is not None
        topic = self.topics.devices_state
        records = [(device_id.encode(), encode_state(state)) for device_id, state in states.items()]
        for attempt in itertools.count():
            try:
                futures = [await producer.send(topic, value, key=key) for key, value in records]
                await asyncio.gather(*futures)
            except KafkaError as exc:
                if is_fatal(exc, producer):
                    raise
                delay = _BACKOFF.delay(attempt)
                log.warning("state_write_failed", error=describe_kafka_error(exc), retry_in_s=delay)
                if self._stop.is_set():
                    raise _Stopped from None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                continue
            self.metrics.written.inc(len(records))
            return

    async def _shutdown(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(KafkaError, TimeoutError):
                    await asyncio.wait_for(client.stop(), 5)
        self._consumer = self._producer = None
        if self.health is not None:
            self.health.stop()
        log.info("state_stopped", devices=len(self.merger.states))


def _rewind(consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]) -> None:
    """Fetch again what a rebalance overtook (the partitions this instance still has)."""
    assignment = consumer.assignment()
    for tp, records in batches.items():
        if records and tp in assignment:
            with contextlib.suppress(IllegalStateError):
                consumer.seek(tp, records[0].offset)
