"""`iotgw run rules`: the rule engine on iot.readings and iot.availability, alerts out,
actions on firing."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from typing import Any

import httpx
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from gmqtt import Client

from gateway.adapters.kafka import (
    consumer_lag,
    create_consumer,
    create_producer,
    read_topic,
    started,
)
from gateway.adapters.mqtt import connect
from gateway.clock import now_ms
from gateway.domain.backoff import Backoff
from gateway.domain.records import AvailabilityRecord, CanonicalReading
from gateway.domain.rules import (
    Alert,
    RuleEngine,
    RuleState,
    decode_availability,
    decode_reading,
)
from gateway.domain.rules_file import load_rules
from gateway.services.registry import DeviceRegistry
from gateway.services.runtime import HealthServer, RulesMetrics
from gateway.settings import Settings
from gateway.topics import Topics, commands_topic
from schemas.rules import Rule, Webhook

__all__ = ["RulesService"]

log = structlog.get_logger(__name__)

_TICK_S = 1.0
# Readings evaluated (and committed) together at most: a larger batch writes a state
# that changes on every reading (rate, absence) once for more readings.
_MAX_BATCH = 20_000
# A partition's share of one fetch: about 16,000 canonical readings, so a backlog comes
# in large batches (aiokafka's default, 1 MB, brings a few thousand).
_FETCH_BYTES = 4 * 1024 * 1024
# How long a batch may keep gathering a backlog (bounds the latency it adds).
_LINGER_S = 0.2
# Record batches of the state topic: a rate rule's state holds its window's points.
_STATE_BATCH_BYTES = 512 * 1024
_WEBHOOK_BACKOFF = Backoff(first=0.5, cap=8.0)


def _behind(consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[Any]]) -> bool:
    """Whether a partition fetched has records past those fetched (a backlog)."""
    for tp, records in batches.items():
        highwater = consumer.highwater(tp)
        if records and highwater is not None and highwater > records[-1].offset + 1:
            return True
    return False


def state_key(rule_id: str, device_id: str) -> bytes:
    return f"{rule_id}|{device_id}".encode()


class RulesService:
    """Consumer group `iotgw-rules` on iot.readings and iot.availability (the `offline`
    rules'); alerts to iot.alerts.

    Restart safety: each batch's alerts, the rule states it changed (compacted topic
    `iot.rules.state`) and the consumer offsets are written in one Kafka transaction.
    After a crash the engine reloads the states and resumes from the committed offsets,
    so an alert that is firing does not fire again and no transition is missed.
    Actions (MQTT command, webhook) run after the transaction commits.
    """

    def __init__(self, settings: Settings, metrics: RulesMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or RulesMetrics()
        self.topics = Topics(settings.topic_prefix)
        self.rules: list[Rule] = load_rules(settings.rules_file, settings.catalogue()).rules
        self.by_id = {rule.id: rule for rule in self.rules}
        self.registry = DeviceRegistry(settings)
        self.engine = RuleEngine(
            self.rules,
            self.registry.get,
            grace_ms=int(settings.rules_grace_s * 1000),
            devices=lambda: self.registry,
            started_ms=now_ms(),
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._mqtt: Client | None = None
        self._http = httpx.AsyncClient()
        self._actions: set[asyncio.Task[None]] = set()
        self._last_delivery: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._late_counted = 0
        self.health: HealthServer | None = None

    def readiness(self) -> dict[str, bool]:
        return {
            "kafka": self._consumer is not None,
            "registry": self.registry.ready.is_set(),
            "mqtt": self._mqtt is not None,
        }

    async def run(self, stop: asyncio.Event) -> None:
        self.health = HealthServer.start_for(
            self.settings, "rules", self.metrics.registry, self.readiness
        )
        try:
            await self.registry.start()
            await self._load_states()
            self._producer = await started(
                create_producer(
                    self.settings,
                    transactional_id=self.settings.rules_instance_id,
                    max_batch_size=_STATE_BATCH_BYTES,
                ),
                self.settings,
            )
            self._mqtt = await self._connect_mqtt()
            self._consumer = await started(
                create_consumer(
                    self.settings,
                    self.topics.readings,
                    self.topics.availability,
                    group_id=self.settings.rules_group,
                    committed_only=True,
                    max_partition_fetch_bytes=_FETCH_BYTES,
                ),
                self.settings,
            )
            log.info(
                "rules_started",
                rules=len(self.rules),
                group=self.settings.rules_group,
                states=len(self.engine.states),
                metrics=f"http://{self.settings.metrics_host}:{self.health.port}/metrics",
            )
            await self._consume(self._consumer, stop)
        finally:
            await self._shutdown()

    async def _load_states(self) -> None:
        """Read the compacted state topic to its end (committed records only)."""
        await read_topic(
            self.settings, self.topics.rules_state, self._apply_states, committed_only=True
        )

    def _apply_states(self, records: list[Any]) -> None:
        for record in records:
            rule_id, _, device_id = record.key.decode().partition("|")
            if record.value is None:
                self.engine.restore((rule_id, device_id), None)
            elif rule_id in self.by_id:
                self.engine.restore(
                    (rule_id, device_id), RuleState.from_dict(json.loads(record.value))
                )

    async def _connect_mqtt(self) -> Client:
        client = Client(f"{self.settings.rules_instance_id}-commands")
        await connect(
            client,
            self.settings.mqtt,
            ca_file=self.settings.mqtt_ca_file,
            timeout_s=self.settings.timeout_s,
        )
        return client

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        last_tick = 0.0
        while not stop.is_set():
            batches = await self._fetch(consumer)
            now = now_ms()
            readings: list[CanonicalReading] = []
            availability: list[AvailabilityRecord] = []
            offsets: dict[TopicPartition, int] = {}
            fetched = 0
            for tp, records in batches.items():
                if tp.topic == self.topics.availability:
                    for record in records:
                        try:
                            availability.append(decode_availability(record.value))
                        except ValueError as exc:
                            log.warning("availability_skipped", offset=record.offset, error=exc)
                else:
                    for record in records:
                        try:
                            readings.append(decode_reading(record.value))
                        except ValueError as exc:
                            log.warning("reading_skipped", offset=record.offset, error=exc)
                    fetched += len(records)
                if records:
                    offsets[tp] = records[-1].offset + 1
            alerts = self.engine.evaluate_batch(readings, now)
            alerts.extend(self.engine.evaluate_availability(availability))
            self.metrics.evaluated.inc(fetched)
            if time.monotonic() - last_tick >= _TICK_S:
                last_tick = time.monotonic()
                # An online record still unread would resolve an offline device's wait:
                # its timer fires only once the engine has read every availability record.
                caught_up = await self._read_all(consumer, self.topics.availability)
                alerts.extend(self.engine.tick(now, offline=caught_up))
                await self._update_lag(consumer)
            self.metrics.late.inc(self.engine.late - self._late_counted)
            self._late_counted = self.engine.late
            if alerts or offsets or self.engine.changed:
                await self._commit(alerts, offsets)
            for alert in alerts:
                self._act(alert)

    async def _fetch(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, list[Any]]:
        """Up to _MAX_BATCH records: up to a tick for the first, then more while behind."""
        # A backlog is evaluated and committed in large batches (one transaction, and one
        # write of each changed state, for many readings); on a caught-up stream a reading
        # is evaluated at once.
        batches: dict[TopicPartition, list[Any]] = await consumer.getmany(
            timeout_ms=int(_TICK_S * 1000), max_records=_MAX_BATCH
        )
        fetched = sum(len(records) for records in batches.values())
        deadline = time.monotonic() + _LINGER_S
        while (
            0 < fetched < _MAX_BATCH
            and _behind(consumer, batches)
            and (left := deadline - time.monotonic()) > 0
        ):
            more = await consumer.getmany(
                timeout_ms=max(1, int(left * 1000)), max_records=_MAX_BATCH - fetched
            )
            for tp, records in more.items():
                batches.setdefault(tp, []).extend(records)
                fetched += len(records)
        return batches

    @staticmethod
    async def _read_all(consumer: AIOKafkaConsumer, topic: str) -> bool:
        """Whether the consumer has read every record of its partitions of `topic` it knows
        of (False while it does not know their end yet)."""
        for tp in consumer.assignment():
            if tp.topic != topic:
                continue
            highwater = consumer.highwater(tp)
            if highwater is None or await consumer.position(tp) < highwater:
                return False
        return True

    async def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        self.metrics.lag.set(await consumer_lag(consumer))

    async def _commit(self, alerts: list[Alert], offsets: dict[TopicPartition, int]) -> None:
        """Alerts, changed states and offsets, all or nothing."""
        assert self._producer is not None
        changed, self.engine.changed = self.engine.changed, set()
        async with self._producer.transaction():
            for alert in alerts:
                await self._producer.send(
                    self.topics.alerts,
                    json.dumps(alert.record()).encode(),
                    key=alert.device_id.encode(),
                )
            await self._send_states(self._producer, changed)
            if offsets:
                await self._producer.send_offsets_to_transaction(offsets, self.settings.rules_group)
        for alert in alerts:
            self.metrics.alerts.labels(alert.rule, alert.state).inc()
            log.info(
                "alert",
                rule=alert.rule,
                device_id=alert.device_id,
                state=alert.state,
                value=alert.value,
            )

    async def _send_states(self, producer: AIOKafkaProducer, changed: set[tuple[str, str]]) -> None:
        """The changed states (a tombstone for one removed), one send per record batch."""
        batch = producer.create_batch()
        for (rule_id, device_id), value in self.engine.records(changed):
            key = state_key(rule_id, device_id)
            if batch.append(key=key, value=value, timestamp=None) is None:
                await producer.send_batch(batch, self.topics.rules_state, partition=0)
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        if batch.record_count():
            await producer.send_batch(batch, self.topics.rules_state, partition=0)

    def _act(self, alert: Alert) -> None:
        rule = self.by_id.get(alert.rule)
        if rule is None:
            return
        for action in rule.actions:
            if (
                action.mqtt_command is not None
                and alert.state == "firing"
                and self._mqtt is not None
            ):
                payload = json.dumps(action.mqtt_command.payload).encode()
                try:
                    self._mqtt.publish(commands_topic(alert.device_id), payload, qos=1)
                except OverflowError:
                    self.metrics.action_failures.labels("mqtt_command").inc()
                    log.warning(
                        "command_dropped", device_id=alert.device_id, reason="in_flight_full"
                    )
            if action.webhook is not None:
                # Deliveries of one rule and device go out in order (firing before
                # resolved), however long the retries of the earlier one take.
                chain = (str(action.webhook.url), alert.rule, alert.device_id)
                previous = self._last_delivery.get(chain)
                task = asyncio.create_task(self._post(action.webhook, alert, previous))
                self._last_delivery[chain] = task
                self._actions.add(task)
                task.add_done_callback(functools.partial(self._delivered, chain))

    def _delivered(self, chain: tuple[str, str, str], task: asyncio.Task[None]) -> None:
        self._actions.discard(task)
        if self._last_delivery.get(chain) is task:
            del self._last_delivery[chain]

    async def _post(
        self, webhook: Webhook, alert: Alert, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        body = alert.record()
        for attempt in range(webhook.retries + 1):
            try:
                response = await self._http.post(
                    str(webhook.url), json=body, timeout=webhook.timeout
                )
                if response.status_code < 300:
                    return
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = str(exc) or type(exc).__name__
            if attempt < webhook.retries:
                await asyncio.sleep(_WEBHOOK_BACKOFF.delay(attempt))
        self.metrics.action_failures.labels("webhook").inc()
        log.warning("webhook_failed", url=webhook.url, rule=alert.rule, error=reason)

    async def _shutdown(self) -> None:
        for task in list(self._actions):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2)
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(KafkaError, TimeoutError):
                    await asyncio.wait_for(client.stop(), 5)
        self._consumer = self._producer = None
        if self._mqtt is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._mqtt.disconnect(), 2)
            self._mqtt = None
        await self.registry.stop()
        await self._http.aclose()
        if self.health is not None:
            self.health.stop()
        log.info("rules_stopped")
