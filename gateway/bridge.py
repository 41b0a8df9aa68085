"""The ingestion bridge: MQTT readings validated into Kafka, acknowledged only after Kafka."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.handler import MQTTConnectError

from gateway.errors import IotgwError
from gateway.kafka import create_producer, describe_kafka_error
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


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class NotAcknowledged(Exception):  # noqa: N818 - a signal to gmqtt, not an error
    """Raised by the message handler so that gmqtt sends no PUBACK for the message.

    gmqtt acknowledges when the handler returns; raising keeps the message
    unacknowledged in the broker's session, which sends it again after a reconnect.
    """


@dataclass
class _Pending:
    """One MQTT message's records on their way to Kafka."""

    outcomes: list[Outcome]
    done: asyncio.Future[None]
    received: float = field(default_factory=time.monotonic)


class KafkaPublisher:
    """Sends records to Kafka in the order their messages arrived, retrying until acknowledged.

    `submit` is synchronous, so messages are queued in arrival order; one task hands them
    to the idempotent producer in that order, which keeps each partition (so each device)
    in order. A message's future resolves once Kafka acknowledged all of its records.
    """

    def __init__(self, producer: AIOKafkaProducer, topics: Topics, metrics: BridgeMetrics) -> None:
        self._producer = producer
        self._topics = topics
        self._metrics = metrics
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()

    def submit(self, outcomes: list[Outcome]) -> asyncio.Future[None]:
        pending = _Pending(outcomes, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wakeup.set()
        return pending.done

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                pending = self._queue.popleft()
                futures = [await self._send(outcome) for outcome in pending.outcomes]
                self._track(pending, futures)

    async def _send(self, outcome: Outcome) -> asyncio.Future[Any]:
        key: str | None
        if isinstance(outcome, Accepted):
            topic, key, value = self._topics.readings, outcome.device_id, outcome.value
            headers = [("schema", READING_SCHEMA)]
        else:
            topic, key, value = self._topics.dead_letters, outcome.device_id, outcome.original
            headers = [
                ("error", outcome.reason.value.encode()),
                ("detail", outcome.detail.encode()),
                ("mqtt_topic", outcome.mqtt_topic.encode()),
                ("received_at", str(outcome.received_at).encode()),
            ]
        attempt = 0
        while True:
            try:
                future: asyncio.Future[Any] = await self._producer.send(
                    topic, value, key=key.encode() if key else None, headers=headers
                )
                return future
            except KafkaError as exc:
                # The buffer is full and Kafka does not take it: wait and try the same
                # record again; nothing after it is sent before it.
                delay = _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S) - 1)]
                log.warning(
                    "event=kafka_send_failed error=%s retry_in_s=%s",
                    describe_kafka_error(exc),
                    delay,
                )
                self._metrics.kafka_retries.inc()
                attempt += 1
                await asyncio.sleep(delay)

    def _track(self, pending: _Pending, futures: list[asyncio.Future[Any]]) -> None:
        if not futures:
            pending.done.set_result(None)
            return
        waiting = asyncio.gather(*futures, return_exceptions=True)
        waiting.add_done_callback(lambda g: self._settle(pending, g.result()))

    def _settle(self, pending: _Pending, results: list[Any]) -> None:
        failed = [
            o
            for o, r in zip(pending.outcomes, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failed:
            # Kafka gave up on these records (e.g. a partition without a leader for too
            # long): send them again before anything still queued.
            errors = {describe_kafka_error(r) for r in results if isinstance(r, BaseException)}
            log.warning(
                "event=kafka_delivery_failed records=%d errors=%s", len(failed), sorted(errors)
            )
            self._metrics.kafka_retries.inc(len(failed))
            self._queue.appendleft(_Pending(failed, pending.done, pending.received))
            self._wakeup.set()
            return
        self._metrics.publish_seconds.observe(time.monotonic() - pending.received)
        for outcome in pending.outcomes:
            if isinstance(outcome, Accepted):
                self._metrics.published.inc()
                self._metrics.backlog_age.set(max(0.0, (now_ms() - outcome.ts) / 1000))
            else:
                self._metrics.rejected.labels(outcome.reason.value).inc()
        if not pending.done.done():
            pending.done.set_result(None)


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
        self._closed = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.health: HealthServer | None = None

    @property
    def subscription(self) -> str:
        return f"$share/{self.settings.mqtt_share_group}/devices/+/telemetry"

    def readiness(self) -> dict[str, bool]:
        return {
            "mqtt": self._connected,
            "kafka": self._producer is not None,
            "registry": self.registry.ready.is_set(),
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(_quiet_not_acknowledged)
        self.health = HealthServer(
            self.settings.metrics_host,
            self.settings.metrics_port_for("bridge"),
            self.metrics.registry,
            self.readiness,
        )
        self.health.start()
        publisher_task: asyncio.Task[None] | None = None
        try:
            await self.registry.start()
            self._producer = await self._start_producer()
            self._publisher = KafkaPublisher(self._producer, self.topics, self.metrics)
            publisher_task = asyncio.create_task(self._publisher.run(), name="kafka-publisher")
            self._accepting = True
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
        producer = create_producer(self.settings, linger_ms=2)
        try:
            await asyncio.wait_for(producer.start(), self.settings.timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            await producer.stop()
            raise IotgwError(
                f"Kafka is unreachable at {self.settings.kafka_bootstrap}: "
                f"{describe_kafka_error(exc)}"
            ) from None
        return producer

    async def _connect(self) -> None:
        endpoint = self.settings.mqtt
        client = Client(
            self.settings.mqtt_client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=self.settings.mqtt_session_expiry_s,
            receive_maximum=self.settings.max_in_flight,
        )
        client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})
        if endpoint.username:
            password = endpoint.password.get_secret_value() if endpoint.password else None
            client.set_auth_credentials(endpoint.username, password)
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._client = client
        try:
            await asyncio.wait_for(
                client.connect(endpoint.host, endpoint.port, ssl=endpoint.tls, version=MQTTv50),
                self.settings.timeout_s,
            )
        except (OSError, TimeoutError, MQTTConnectError) as exc:
            raise IotgwError(
                f"MQTT broker unreachable at {endpoint.host}:{endpoint.port}: {exc or 'timed out'}"
            ) from None
        client.subscribe(self.subscription, qos=1)

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:
        self._epoch += 1
        self._connected = True
        log.info("event=mqtt_connected session_present=%s epoch=%d", bool(flags), self._epoch)

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
        self.metrics.in_flight.set(self._in_flight)
        try:
            await done
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
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
