"""Kafka adapters: the producer and consumer factories, reading a topic to its end, admin
sessions, topic creation, and which errors retrying cannot fix."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    InvalidConfigurationError,
    InvalidRequiredAcksError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    PolicyViolationError,
    ProducerClosed,
    ProducerFenced,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedVersionError,
)
from aiokafka.helpers import create_ssl_context

from gateway.errors import IotgwError
from gateway.settings import Settings
from gateway.topics import Topics

__all__ = [
    "TopicResult",
    "broker_ids",
    "consumer_lag",
    "create_consumer",
    "create_producer",
    "describe_kafka_error",
    "end_offsets",
    "ensure_topics",
    "is_fatal",
    "kafka_admin",
    "kafka_security",
    "produce",
    "read_to_end",
    "read_topic",
    "settings_admin",
    "started",
    "topic_partitions",
]

# Kafka's error codes: a topic that exists already (creating topics is idempotent),
# and one that does not exist.
_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3


def kafka_security(settings: Settings) -> dict[str, Any]:
    """The aiokafka options for the configured TLS and SASL (none for PLAINTEXT)."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        try:
            options["ssl_context"] = create_ssl_context(
                cafile=str(settings.kafka_ca_file) if settings.kafka_ca_file else None
            )
        except (OSError, ValueError) as exc:
            raise IotgwError(f"cannot use the CA file {settings.kafka_ca_file}: {exc}") from None
    if protocol.startswith("SASL_"):
        assert settings.kafka_password is not None  # the settings require it with SASL
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_username,
            "sasl_plain_password": settings.kafka_password.get_secret_value(),
        }
    return options


def kafka_connection(settings: Settings) -> dict[str, Any]:
    """Where Kafka is and how to connect: the options every Kafka client of iotgw starts from."""
    return {"bootstrap_servers": settings.kafka_bootstrap, **kafka_security(settings)}


def create_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """The producer every part of iotgw uses: idempotent with acks=all (DESIGN.md, "Kafka").

    Idempotence keeps a device's readings in order inside its partition across retries.
    """
    options: dict[str, Any] = {
        **kafka_connection(settings),
        "acks": "all",
        "enable_idempotence": True,
        "request_timeout_ms": int(settings.timeout_s * 1000),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def create_consumer(
    settings: Settings, *topics: str, committed_only: bool = False, **overrides: Any
) -> AIOKafkaConsumer:
    """The consumer every part of iotgw uses: the configured Kafka, no automatic commits
    (a service commits what it has done), from the earliest offset of a new group;
    subscribed to `topics` when given, else to be assigned partitions. `committed_only`
    reads committed transactions only (the rules engine's alerts and state)."""
    options: dict[str, Any] = {
        **kafka_connection(settings),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed" if committed_only else "read_uncommitted",
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


Startable = TypeVar("Startable", AIOKafkaProducer, AIOKafkaConsumer)


async def started(client: Startable, settings: Settings) -> Startable:
    """Start an aiokafka client within the configured timeout; IotgwError if Kafka is away."""
    try:
        await asyncio.wait_for(client.start(), settings.timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        await client.stop()
        raise IotgwError(
            f"Kafka is unreachable at {settings.kafka_bootstrap}: {describe_kafka_error(exc)}"
        ) from None
    return client


@asynccontextmanager
async def kafka_admin(
    bootstrap: str, timeout_s: float, **security: Any
) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin session; an unreachable cluster becomes one IotgwError within `timeout_s`.

    `security` takes `kafka_security(settings)`; the local stack's probes need none.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **security
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        await admin.close()
        raise IotgwError(
            f"Kafka is unreachable at {bootstrap}: {describe_kafka_error(exc)}"
        ) from None
    try:
        yield admin
    finally:
        await admin.close()


async def broker_ids(bootstrap: str, timeout_s: float) -> list[int]:
    """The ids of the brokers the cluster's metadata lists."""
    async with kafka_admin(bootstrap, timeout_s) as admin:
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    return sorted(int(broker["node_id"]) for broker in cluster["brokers"])


def settings_admin(
    settings: Settings,
) -> contextlib.AbstractAsyncContextManager[AIOKafkaAdminClient]:
    """An admin session on the configured Kafka, with its security."""
    return kafka_admin(settings.kafka_bootstrap, settings.timeout_s, **kafka_security(settings))


async def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partition ids of `topic`; IotgwError naming `iotgw topics create` if it is missing."""
    async with settings_admin(settings) as admin:
        described = await _await_leaders(admin, [topic], settings.timeout_s, missing_is_error=True)
    return sorted(int(p["partition"]) for p in described[topic]["partitions"])


async def _await_leaders(
    admin: AIOKafkaAdminClient, topics: list[str], timeout_s: float, *, missing_is_error: bool
) -> dict[str, Any]:
    """Describe `topics` once every partition has a leader.

    Just after creation a topic may still be unknown to the broker's metadata or lack
    leaders, so the creator waits (`missing_is_error=False`); a reader fails at once.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            described = await asyncio.wait_for(admin.describe_topics(topics), timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise IotgwError(f"describing topics failed: {describe_kafka_error(exc)}") from None
        by_name = {t["topic"]: t for t in described}
        missing = [t for t in topics if by_name.get(t, {}).get("error_code") == _UNKNOWN_TOPIC]
        if missing and missing_is_error:
            raise IotgwError(
                f"Kafka has no topic {missing[0]}: create it with `iotgw topics create`"
            )
        if all(_has_leaders(by_name.get(t)) for t in topics):
            return by_name
        if asyncio.get_running_loop().time() > deadline:
            raise IotgwError(f"topics {', '.join(topics)} have no leader after {timeout_s:.0f} s")
        await asyncio.sleep(0.1)


def _has_leaders(described: dict[str, Any] | None) -> bool:
    return (
        described is not None
        and described["error_code"] == 0
        and bool(described["partitions"])
        and all(p["leader"] >= 0 for p in described["partitions"])
    )


async def read_to_end(
    consumer: AIOKafkaConsumer,
    apply: Callable[[list[ConsumerRecord[bytes, bytes]]], None],
    *,
    idle_timeout_s: float,
) -> dict[TopicPartition, int]:
    """Hand `apply` every record of the consumer's assigned partitions from their positions
    to their end offsets at the time of the call (and what comes with the last batches),
    then return those end offsets. Fails with TimeoutError only when nothing arrives for
    `idle_timeout_s`, however long the topic."""
    partitions = sorted(consumer.assignment())
    end: dict[TopicPartition, int] = await asyncio.wait_for(
        consumer.end_offsets(partitions), idle_timeout_s
    )
    pending = {tp for tp in partitions if await consumer.position(tp) < end[tp]}
    last_progress = time.monotonic()
    while pending:
        batches = await consumer.getmany(*pending, timeout_ms=500, max_records=10_000)
        for records in batches.values():
            apply(records)
        if batches:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > idle_timeout_s:
            raise TimeoutError
        pending = {tp for tp in pending if await consumer.position(tp) < end[tp]}
    return end


async def read_topic(
    settings: Settings,
    topic: str,
    apply: Callable[[list[ConsumerRecord[bytes, bytes]]], None],
    *,
    committed_only: bool = False,
    since_ms: int | None = None,
) -> dict[TopicPartition, int]:
    """Read `topic` from its beginning (or from the first record at or after `since_ms`)
    to its end offsets at the time of the call; returns those end offsets."""
    partitions = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
    consumer = await started(create_consumer(settings, committed_only=committed_only), settings)
    try:
        consumer.assign(partitions)
        if since_ms is None:
            await consumer.seek_to_beginning(*partitions)
        else:
            starts = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
            for tp in partitions:
                if (found := starts.get(tp)) is not None:
                    consumer.seek(tp, found.offset)
                else:
                    await consumer.seek_to_end(tp)
        return await read_to_end(consumer, apply, idle_timeout_s=settings.timeout_s)
    finally:
        await consumer.stop()


async def produce(
    settings: Settings, topic: str, records: Iterable[tuple[bytes | None, bytes]], **overrides: Any
) -> None:
    """Write records (key, value) to `topic` and wait for Kafka's acknowledgements; the
    producer's options may be overridden (larger batches for bulk loads)."""
    producer = await started(create_producer(settings, **overrides), settings)
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def end_offsets(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    """The end offset of each partition of `topic` now."""
    partitions = [TopicPartition(topic, p) for p in await topic_partitions(settings, topic)]
    consumer = await started(create_consumer(settings), settings)
    try:
        offsets: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return offsets


async def consumer_lag(consumer: AIOKafkaConsumer) -> int:
    """Records in the consumer's assigned partitions that it has not read yet."""
    lag = 0
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            lag += max(0, highwater - await consumer.position(tp))
    return lag


@dataclass(frozen=True)
class TopicResult:
    """What `ensure_topics` did with one topic."""

    name: str
    partitions: int
    replication: int
    created: bool


async def ensure_topics(settings: Settings) -> list[TopicResult]:
    """Create the topics of DESIGN.md that are missing; existing ones are left as they are.

    The replication factor is 3 on a cluster of three or more brokers (so a broker can
    die without loss, with `min.insync.replicas=2` from the brokers), else the broker count.
    """
    specs = Topics(settings.topic_prefix).specs(
        settings.readings_partitions, settings.pending_max_age_s
    )
    async with settings_admin(settings) as admin:
        try:
            replication = await _replication(admin, settings)
            response = await asyncio.wait_for(
                admin.create_topics(
                    [
                        NewTopic(
                            spec.name, spec.partitions, replication, topic_configs=spec.configs
                        )
                        for spec in specs
                    ]
                ),
                settings.timeout_s,
            )
        except (KafkaError, TimeoutError) as exc:
            raise IotgwError(f"creating topics failed: {describe_kafka_error(exc)}") from None
        errors = {topic: (code, message) for topic, code, message in response.topic_errors}
        failed = [(t, m, c) for t, (c, m) in errors.items() if c not in (0, _TOPIC_ALREADY_EXISTS)]
        if failed:
            topic, message, code = failed[0]
            raise IotgwError(f"creating topic {topic} failed: {message or f'error {code}'}")
        # Return only once the topics are usable, so the next command can rely on them.
        await _await_leaders(
            admin, [spec.name for spec in specs], settings.timeout_s, missing_is_error=False
        )
    return [
        TopicResult(s.name, s.partitions, replication, created=errors.get(s.name, (0, ""))[0] == 0)
        for s in specs
    ]


async def _replication(admin: AIOKafkaAdminClient, settings: Settings) -> int:
    """The replication factor for new topics; with IOTGW_TOPIC_REPLICATION, once the
    cluster has that many brokers (brokers of a new cluster register one by one)."""
    deadline = asyncio.get_running_loop().time() + settings.timeout_s
    while True:
        cluster = await asyncio.wait_for(admin.describe_cluster(), settings.timeout_s)
        brokers = len(cluster["brokers"])
        wanted = settings.topic_replication
        if wanted is None:
            return min(3, brokers)
        if brokers >= wanted:
            return wanted
        if asyncio.get_running_loop().time() > deadline:
            raise IotgwError(
                f"IOTGW_TOPIC_REPLICATION={wanted} needs {wanted} brokers; "
                f"Kafka has {brokers} after {settings.timeout_s:.0f} s"
            )
        await asyncio.sleep(0.5)


# Kafka errors retrying cannot fix: a service stops on them with a one-line reason instead
# of retrying forever. Everything else (no broker, no leader, timeouts) is transient.
FATAL_KAFKA_ERRORS: tuple[type[Exception], ...] = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    SaslAuthenticationFailed,
    InvalidConfigurationError,
    InvalidRequiredAcksError,
    InvalidTopicError,
    PolicyViolationError,
    UnsupportedVersionError,
    RecordTooLargeError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    ProducerClosed,
)


def is_fatal(exc: BaseException, producer: AIOKafkaProducer | None = None) -> bool:
    """True when retrying cannot help: an error of FATAL_KAFKA_ERRORS, or any error once
    `producer`'s sender has stopped (aiokafka then fails every later send with it)."""
    if isinstance(exc, FATAL_KAFKA_ERRORS):
        return True
    # aiokafka has no public way to ask; its sender task ends only on a fatal error.
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return task is not None and task.done()


def describe_kafka_error(exc: BaseException) -> str:
    """A short reason for a Kafka failure, fit for a one-line error."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, KafkaConnectionError):
        return "no broker answered"
    return str(exc) or type(exc).__name__
