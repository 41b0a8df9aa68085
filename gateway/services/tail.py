"""`iotgw tail`: a live view of validated readings as they reach iot.readings."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime

from aiokafka import TopicPartition

from gateway.adapters.kafka import create_consumer, started, topic_partitions
from gateway.domain.records import CanonicalReading
from gateway.settings import Settings
from gateway.topics import Topics

__all__ = ["format_reading", "tail"]


def format_reading(reading: CanonicalReading) -> str:
    """One line for people: time, device, type, seq and the metrics."""
    when = datetime.fromtimestamp(reading["ts"] / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]
    metrics = " ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in reading["metrics"].items()
    )
    return f"{when} {reading['device_id']} {reading['type']} #{reading['seq']} {metrics}"


async def tail(
    settings: Settings,
    emit: Callable[[CanonicalReading], None],
    *,
    device: str | None = None,
    count: int | None = None,
    on_ready: Callable[[], None] = lambda: None,
) -> int:
    """Follow new readings (optionally of one device) until `count` were shown; returns how many."""
    topic = Topics(settings.topic_prefix).readings
    ids = await topic_partitions(settings, topic)
    partitions = [TopicPartition(topic, p) for p in ids]
    consumer = await started(create_consumer(settings, fetch_max_wait_ms=100), settings)
    shown = 0
    try:
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        on_ready()
        while count is None or shown < count:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    reading = json.loads(record.value)
                    if device is not None and reading.get("device_id") != device:
                        continue
                    emit(reading)
                    shown += 1
                    if count is not None and shown >= count:
                        return shown
    except asyncio.CancelledError:
        pass
    finally:
        await consumer.stop()
    return shown
