"""The ingestion bridge: MQTT readings validated into Kafka, acknowledged only after Kafka."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50

from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.kafka import create_producer, describe_kafka_error, started
from gateway.mqtt import connect
from gateway.observability import BridgeMetrics, HealthServer
from gateway.ratelimit import RateLimiter
from gateway.registry import DeviceRegistry
from gateway.settings import Settings
from gateway.topics import Topics
from gateway.validation import READING_SCHEMA, Accepted, Outcome, ReadingValidator

log = logging.getLogger(__name__)

# SIGTERM must end the bridge within 10 s: this long for Kafka to acknowledge what is in
# flight, the rest for closing the connections.
DRAIN_TIMEOUT_S = 7.0
_RETRY_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# At most this many queued messages are packed into batches before they are sent.
_MAX_ROUND = 5000
# One Kafka request carries up to this many bytes of one partition's records.
_BATCH_BYTES = 512 * 1024
# Seconds between attempts to reach a broker that went away.
_RECONNECT_DELAY_S = 0.2


class NotAcknowledged(Exception):  # noqa: N818 - a signal to gmqtt, not an error
    """Raised by the message handler so that gmqtt sends no PUBACK for the message.

    gmqtt acknowledges when the handler returns; raising keeps the message
    unacknowledged in the broker's session, which sends it again after a reconnect.
    """


@dataclass(eq=False)
class _Pending:
    """One MQTT message's records on their way to Kafka.

    A retry of some of them is a `_Pending` of its own whose `root` is the message's.
    """

    outcomes: list[Outcome]
    done: asyncio.Future[None]
    received: float = field(default_factory=time.monotonic)
    root: _Pending | None = None
    remaining: int = 0  # records of the message Kafka has not acknowledged yet


@dataclass(eq=False)
class _Batch:
    """Records for one partition, sent to Kafka in one request."""

    topic: str
    partition: int
    builder: Any
    members: list[tuple[_Pending, Outcome]] = field(default_factory=list)


class KafkaPublisher:
    """Sends records to Kafka in the order their messages arrived, retrying until acknowledged.

    `submit` is synchronous, so messages are queued in arrival order. One task takes
    what is queued, packs it into one batch per partition (the partition the Java
    client's murmur2 partitioner picks for the key) and hands the batches to the
    idempotent producer in order, which keeps each device's readings in order. A
    message's future resolves once Kafka acknowledged all of its records.
    """

    def __init__(self, producer: AIOKafkaProducer, topics: Topics, metrics: BridgeMetrics) -> None:
        self._producer = producer
        self._topics = topics
        self._metrics = metrics
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._partitioner = DefaultPartitioner()
        self._unkeyed = 0

    def submit(self, outcomes: list[Outcome]) -> asyncio.Future[None]:
        pending = _Pending(outcomes, asyncio.get_running_loop().create_future())
        pending.remaining = len(outcomes)
        if not outcomes:
            pending.done.set_result(None)
        self._queue.append(pending)
        self._wakeup.set()
        return pending.done

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                taken = [self._queue.popleft() for _ in range(min(len(self._queue), _MAX_ROUND))]
                await self._send_round(taken)

    async def _send_round(self, taken: list[_Pending]) -> None:
        partitions = {
            topic: sorted(await self._producer.partitions_for(topic))
            for topic in (self._topics.readings, self._topics.dead_letters)
        }
        batches: dict[tuple[str, int], _Batch] = {}
        for pending in taken:
            root = pending.root or pending
            for outcome in pending.outcomes:
                topic, key, value, headers = self._record(outcome)
                partition = self._partition(key, partitions[topic])
                batch = batches.get((topic, partition))
                if batch is None or not self._append(batch, root, outcome, key, value, headers):
                    if batch is not None:
                        await self._flush(batch)
                    batch = _Batch(topic, partition, self._producer.create_batch())
                    batches[(topic, partition)] = batch
                    if not self._append(batch, root, outcome, key, value, headers):
                        raise RuntimeError("a record larger than an empty batch")
        for batch in batches.values():
            await self._flush(batch)

    def _record(self, outcome: Outcome) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
        if isinstance(outcome, Accepted):
            return (
                self._topics.readings,
                outcome.device_id.encode(),
                outcome.value,
                [("schema", READING_SCHEMA)],
            )
        headers = [
            ("error", outcome.reason.value.encode()),
            ("detail", outcome.detail.encode()),
            ("mqtt_topic", outcome.mqtt_topic.encode()),
            ("received_at", str(outcome.received_at).encode()),
        ]
        key = outcome.device_id.encode() if outcome.device_id else None
        return self._topics.dead_letters, key, outcome.original, headers

    def _partition(self, key: bytes | None, partitions: list[int]) -> int:
        if key is None:
            self._unkeyed += 1
            return partitions[self._unkeyed % len(partitions)]
        return int(self._partitioner(key, partitions, partitions))

    @staticmethod
    def _append(
        batch: _Batch,
        root: _Pending,
        outcome: Outcome,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> bool:
        if batch.builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            return False
        batch.members.append((root, outcome))
        return True

    async def _flush(self, batch: _Batch) -> None:
        attempt = 0
        while True:
            try:
                delivered = await self._producer.send_batch(
                    batch.builder, batch.topic, partition=batch.partition
                )
                break
            except KafkaError as exc:
                # Kafka does not take the batch (down, or its queue full): wait and try the
                # same batch again; nothing queued after it is sent before it.
                delay = _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S) - 1)]
                log.warning(
                    "event=kafka_send_failed error=%s retry_in_s=%s",
                    describe_kafka_error(exc),
                    delay,
                )
                self._metrics.kafka_retries.inc(len(batch.members))
                attempt += 1
                await asyncio.sleep(delay)
        delivered.add_done_callback(lambda future: self._settle(batch, future))

    def _settle(self, batch: _Batch, delivered: asyncio.Future[Any]) -> None:
        if delivered.cancelled() or delivered.exception() is not None:
            # Kafka gave up on the batch (e.g. a partition without a leader for too long):
            # send its records again before anything still queued.
            error = "cancelled" if delivered.cancelled() else delivered.exception()
            log.warning(
                "event=kafka_delivery_failed records=%d error=%s", len(batch.members), error
            )
            self._metrics.kafka_retries.inc(len(batch.members))
            by_message: dict[_Pending, list[Outcome]] = {}
            for root, outcome in batch.members:
                by_message.setdefault(root, []).append(outcome)
            for root, outcomes in reversed(by_message.items()):
                self._queue.appendleft(_Pending(outcomes, root.done, root.received, root))
            self._wakeup.set()
            return
        now = time.monotonic()
        published = 0
        newest_ts = 0
        for root, outcome in batch.members:
            if isinstance(outcome, Accepted):
                published += 1
                newest_ts = max(newest_ts, outcome.ts)
            else:
                self._metrics.rejected.labels(outcome.reason.value).inc()
            root.remaining -= 1
            if root.remaining == 0 and not root.done.done():
                self._metrics.publish_seconds.observe(now - root.received)
                root.done.set_result(None)
        if published:
            self._metrics.published.inc(published)
            self._metrics.backlog_age.set(max(0.0, (now_ms() - newest_ts) / 1000))


class Bridge:
    """`iotgw run bridge`: the shared MQTT subscription in, Kafka out, at least once.

    A message is acknowledged to the broker (PUBACK) only after Kafka acknowledged each of
    its readings or dead letters. The MQTT 5 receive maximum bounds the messages in
    flight: when Kafka is slow or down the broker stops sending and keeps the backlog in
    the bridge's persistent session.
    """

    def __init__(self, settings: Settings, metrics: BridgeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or BridgeMetrics()
        self.topics = Topics(settings.topic_prefix)
        self.registry = DeviceRegistry(settings)
        self.validator = ReadingValidator(
            self.registry.get,
            require_registration=settings.require_registration,
            max_age_ms=int(settings.max_reading_age_s * 1000),
            limiter=RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst),
        )
        self._producer: AIOKafkaProducer | None = None
        self._publisher: KafkaPublisher | None = None
        self._client: Client | None = None
        self._connected = False
        # A new number for each MQTT connection: a message finished after its connection
        # was lost must not be acknowledged on the next one (packet ids are reused).
        self._epoch = 0
        self._accepting = False
        self._subscribed = asyncio.Event()
        self._closed = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.metrics.in_flight.set_function(lambda: self._in_flight)
        self.health: HealthServer | None = None

    @property
    def subscription(self) -> str:
        return f"$share/{self.settings.mqtt_share_group}/devices/+/telemetry"

    def readiness(self) -> dict[str, bool]:
        return {
            "mqtt": self._connected and self._subscribed.is_set(),
            "kafka": self._producer is not None,
            "registry": self.registry.ready.is_set(),
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(_quiet_not_acknowledged)
        self.health = HealthServer.start_for(
            self.settings, "bridge", self.metrics.registry, self.readiness
        )
        publisher_task: asyncio.Task[None] | None = None
        try:
            await self.registry.start()
            self._producer = await self._start_producer()
            self._publisher = KafkaPublisher(self._producer, self.topics, self.metrics)
            publisher_task = asyncio.create_task(self._publisher.run(), name="kafka-publisher")
            self._accepting = True
            # Everything loaded so far (registry, schemas, libraries) lives as long as the
            # process: keep it out of the garbage collector's full scans, which otherwise
            # cost more than the readings themselves at high rates.
            gc.freeze()
            await self._connect()
            log.info(
                "event=bridge_started client_id=%s subscription=%s max_in_flight=%d "
                "metrics=http://%s:%d/metrics",
                self.settings.mqtt_client_id,
                self.subscription,
                self.settings.max_in_flight,
                self.settings.metrics_host,
                self.health.port,
            )
            await stop.wait()
        finally:
            await self._shutdown(publisher_task)
            loop.set_exception_handler(previous_handler)

    async def _start_producer(self) -> AIOKafkaProducer:
        return await started(
            create_producer(self.settings, max_batch_size=_BATCH_BYTES), self.settings
        )

    async def _connect(self) -> None:
        client = Client(
            self.settings.mqtt_client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=self.settings.mqtt_session_expiry_s,
            receive_maximum=self.settings.max_in_flight,
        )
        # Reconnect quickly: after a broker restart, devices' readings find no subscriber
        # (and are dropped) until the bridges have subscribed again.
        client.set_config({"reconnect_retries": -1, "reconnect_delay": _RECONNECT_DELAY_S})
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = lambda *args: self._subscribed.set()
        self._client = client
        await connect(
            client, self.settings.mqtt, ca_file=self.settings.mqtt_ca_file,
            timeout_s=self.settings.timeout_s, version=MQTTv50,
        )  # fmt: skip
        client.subscribe(self.subscription, qos=1)
        # Ready only once the broker confirmed the subscription: before that, readings of
        # a group that never subscribed have no one to be delivered to.
        try:
            await asyncio.wait_for(self._subscribed.wait(), self.settings.timeout_s)
        except TimeoutError:
            raise IotgwError(f"the broker did not confirm {self.subscription}") from None

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:
        self._epoch += 1
        self._connected = True
        log.info("event=mqtt_connected session_present=%s epoch=%d", bool(flags), self._epoch)
        if self._epoch > 1:
            # Subscribe again on every reconnect, even to a session the broker kept:
            # Mosquitto 2.0.11 restores a persistent session after a crash but not its
            # shared subscriptions, and would deliver the bridge nothing ever after.
            # Subscribing to the same filter again replaces it; nothing arrives twice.
            client.subscribe(self.subscription, qos=1)

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:
        self._connected = False
        log.warning("event=mqtt_disconnected error=%s", exc)

    async def _on_message(
        self, client: Client, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        # Everything up to `submit` is synchronous: messages reach Kafka in arrival order.
        epoch = self._epoch
        if not self._accepting:
            # Shutting down: hold it unacknowledged until the connection is closed; the
            # broker sends it again to this or another bridge.
            await self._closed.wait()
            raise NotAcknowledged
        received_at = now_ms()
        outcomes = self.validator.process(topic, payload, received_at)
        self.metrics.messages.inc()
        self.metrics.readings.inc(len(outcomes))
        assert self._publisher is not None
        done = self._publisher.submit(outcomes)
        self._in_flight += 1
        self._idle.clear()
        try:
            await done
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        if epoch != self._epoch or not self._connected:
            self.metrics.redeliveries.inc()
            raise NotAcknowledged
        return 0

    async def _shutdown(self, publisher_task: asyncio.Task[None] | None) -> None:
        """Stop taking messages, let Kafka acknowledge what is in flight, then close."""
        self._accepting = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT_S)
        if self._in_flight:
            log.warning("event=shutdown_unacknowledged messages=%d", self._in_flight)
        # Let the PUBACKs of the last finished handlers go out before disconnecting.
        await asyncio.sleep(0)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.disconnect(), 2)
        self._connected = False
        self._closed.set()
        if publisher_task is not None:
            publisher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher_task
        if self._producer is not None:
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(self._producer.stop(), 2)
            self._producer = None
        await self.registry.stop()
        if self.health is not None:
            self.health.stop()
        log.info("event=bridge_stopped")


def _quiet_not_acknowledged(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Withheld acknowledgements are on purpose; every other loop error is logged."""
    if isinstance(context.get("exception"), NotAcknowledged):
        return
    loop.default_exception_handler(context)
