"""Kafka adapters: the one producer factory, an admin session, and topic creation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

from gateway.errors import IotgwError
from gateway.settings import Settings
from gateway.topics import Topics

# Kafka's error code for a topic that exists already; creating topics is idempotent.
_TOPIC_ALREADY_EXISTS = 36


def create_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """The producer every part of iotgw uses: idempotent with acks=all (DESIGN.md, "Kafka").

    Idempotence keeps a device's readings in order inside its partition across retries.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable_idempotence": True,
        "request_timeout_ms": int(settings.timeout_s * 1000),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


@asynccontextmanager
async def kafka_admin(bootstrap: str, timeout_s: float) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin session; an unreachable cluster becomes one IotgwError within `timeout_s`."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        await admin.close()
        raise IotgwError(f"Kafka is unreachable at {bootstrap}: {_describe(exc)}") from None
    try:
        yield admin
    finally:
        await admin.close()


async def broker_ids(bootstrap: str, timeout_s: float) -> list[int]:
    """The ids of the brokers the cluster's metadata lists."""
    async with kafka_admin(bootstrap, timeout_s) as admin:
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    return sorted(int(broker["node_id"]) for broker in cluster["brokers"])


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
    specs = Topics(settings.topic_prefix).specs(settings.readings_partitions)
    async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
        try:
            cluster = await asyncio.wait_for(admin.describe_cluster(), settings.timeout_s)
            replication = min(3, len(cluster["brokers"]))
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
            raise IotgwError(f"creating topics failed: {_describe(exc)}") from None
    errors = {topic: (code, message) for topic, code, message in response.topic_errors}
    results = []
    for spec in specs:
        code, message = errors.get(spec.name, (0, None))
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            raise IotgwError(f"creating topic {spec.name} failed: {message or f'error {code}'}")
        results.append(TopicResult(spec.name, spec.partitions, replication, created=code == 0))
    return results


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, KafkaConnectionError):
        return "no broker answered"
    return str(exc) or type(exc).__name__
