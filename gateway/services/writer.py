"""The time-series writer: readings, alerts and dead letters from Kafka into InfluxDB."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from gateway.adapters.influx import InfluxClient, InfluxError
from gateway.adapters.kafka import (
    consumer_lag,
    create_consumer,
    create_producer,
    describe_kafka_error,
    started,
)
from gateway.clock import now_ms
from gateway.domain.backoff import Backoff
from gateway.domain.bisect import Refused, write_bisecting
from gateway.domain.deadletters import Reason, dead_letter_headers
from gateway.domain.lineprotocol import LineProtocolError, point, series_key
from gateway.errors import IotgwError
from gateway.services.registry import DeviceRegistry
from gateway.services.runtime import HealthServer, WriterMetrics
from gateway.settings import Settings
from gateway.topics import Topics, telemetry_topic
from schemas import Device

__all__ = ["PointEncoder", "Writer"]

log = structlog.get_logger(__name__)

_BACKOFF = Backoff(first=0.5, cap=15.0)
# How often the writer records its own lag and progress in InfluxDB (for the dashboards).
_STATS_INTERVAL_S = 10.0


@dataclass(frozen=True, slots=True)
class Encoded:
    """A Kafka record as a line of line protocol."""

    record: Any
    line: str
    kind: str  # readings, alerts, rejected


class PointEncoder:
    """Turns records of iot.readings, iot.alerts and iot.readings.dlq into points.

    - readings: measurement = the device type; tags device_id, site, room (from the
      registry); fields = the metrics, plus `seq` (integer) when the reading has one;
      time = the device's `ts`.
    - alerts: measurement `alerts`; tags rule, device_id, state, site, room; fields
      value (a float; booleans as 1.0/0.0) and message; time = the alert's `ts`.
    - dead letters: measurement `rejected`; tags reason, device_id; fields detail and
      bytes; time = when the bridge received it.
    """

    def __init__(self, topics: Topics, lookup: Any) -> None:
        self._topics = topics
        self._lookup = lookup
        self._series: dict[tuple[str, str, str | None, str | None], str] = {}

    def encode(self, record: Any) -> Encoded:
        """One point, or LineProtocolError / ValueError when the record cannot be one."""
        if record.topic == self._topics.readings:
            return Encoded(record, self._reading(record.value), "readings")
        if record.topic == self._topics.alerts:
            return Encoded(record, self._alert(record.value), "alerts")
        return Encoded(record, self._rejected(record), "rejected")

    def _tags(self, device_id: str) -> tuple[str | None, str | None]:
        device: Device | None = self._lookup(device_id)
        return (device.site, device.room) if device is not None else (None, None)

    def _reading(self, value: bytes) -> str:
        reading = json.loads(value)
        device_id, measurement = reading["device_id"], reading["type"]
        site, room = self._tags(device_id)
        cache_key = (measurement, device_id, site, room)
        series = self._series.get(cache_key)
        if series is None:
            series = series_key(measurement, {"device_id": device_id, "site": site, "room": room})
            self._series[cache_key] = series
        fields: dict[str, Any] = dict(reading["metrics"])
        if reading.get("seq") is not None:
            fields["seq"] = int(reading["seq"])
        return point(series, fields, reading["ts"])

    def _alert(self, value: bytes) -> str:
        alert = json.loads(value)
        site, room = self._tags(alert["device_id"])
        tags = {
            "rule": alert["rule"],
            "device_id": alert["device_id"],
            "state": alert["state"],
            "site": site,
            "room": room,
        }
        fields: dict[str, Any] = {"message": str(alert.get("message") or "")}
        number = alert.get("value")
        if isinstance(number, bool):
            fields["value"] = 1.0 if number else 0.0
        elif isinstance(number, int | float):
            fields["value"] = float(number)
        return point(series_key("alerts", tags), fields, alert["ts"])

    def _rejected(self, record: Any) -> str:
        headers = {key: value.decode(errors="replace") for key, value in record.headers}
        tags = {
            "reason": headers.get("error", "unknown"),
            "device_id": record.key.decode(errors="replace") if record.key else None,
        }
        fields = {"detail": headers.get("detail", ""), "bytes": len(record.value or b"")}
        received_at = int(headers.get("received_at") or record.timestamp)
        return point(series_key("rejected", tags), fields, received_at)


class _Stopped(Exception):  # noqa: N818 - control flow
    """Shutdown was asked for while a batch could not be written; it is not committed."""


class Writer:
    """`iotgw run writer`: consumer group `iotgw-writer`, batches into InfluxDB `/write`.

    A batch is written when it holds `writer_batch_size` points or is
    `writer_flush_interval_s` old. Offsets are committed only after InfluxDB answered 2xx
    for every record before them. On 5xx, 429, timeouts or no connection the same batch is
    retried with capped exponential backoff while consumption is paused. A point refused
    with a 4xx goes to the dead-letter topic (`influx_rejected`); the rest is written.
    Replays are harmless: a point with the same series and time is overwritten.
    """

    def __init__(self, settings: Settings, metrics: WriterMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or WriterMetrics()
        self.topics = Topics(settings.topic_prefix)
        self.registry = DeviceRegistry(settings)
        self.encoder = PointEncoder(self.topics, self.registry.get)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._influx = InfluxClient(
            str(settings.influx_url), timeout_s=settings.timeout_s, auth=settings.influx_auth
        )
        self._influx_ok = False
        self._buffer: list[Any] = []
        self._written = 0
        self._lag = 0
        self._last_stats = 0.0
        self._stop = asyncio.Event()
        self.health: HealthServer | None = None

    def readiness(self) -> dict[str, bool]:
        return {
            "kafka": self._consumer is not None,
            "influxdb": self._influx_ok,
            "registry": self.registry.ready.is_set(),
        }

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        self.health = HealthServer.start_for(
            self.settings, "writer", self.metrics.registry, self.readiness
        )
        try:
            await self.registry.start()
            await self._ensure_database()
            self._producer = await started(create_producer(self.settings), self.settings)
            self._consumer = await started(
                create_consumer(
                    self.settings,
                    self.topics.readings,
                    self.topics.alerts,
                    self.topics.dead_letters,
                    group_id=self.settings.writer_group,
                    max_poll_records=self.settings.writer_batch_size,
                    # Alerts are written in transactions: only committed ones are points.
                    committed_only=True,
                    request_timeout_ms=int(self.settings.timeout_s * 1000) + 30_000,
                ),
                self.settings,
            )
            log.info(
                "writer_started",
                group=self.settings.writer_group,
                influx=self.settings.influx_url,
                db=self.settings.influx_db,
                batch=self.settings.writer_batch_size,
                flush_s=self.settings.writer_flush_interval_s,
                metrics=f"http://{self.settings.metrics_host}:{self.health.port}/metrics",
            )
            await self._consume(self._consumer, stop)
        except _Stopped:
            log.warning("stopped_while_influx_failing", note="uncommitted records are read again")
        finally:
            await self._shutdown()

    async def _ensure_database(self) -> None:
        """Create the database (idempotent), waiting while InfluxDB does not answer.

        A user without admin rights may not create databases (403); it may write to one
        that exists, which is how a deployment with authentication is set up.
        """
        db = self.settings.influx_db
        for attempt in itertools.count():
            try:
                await self._influx.create_database(db)
                self._influx_ok = True
                return
            except InfluxError as exc:
                if exc.status == 403:
                    if db in await self._visible_databases():
                        self._influx_ok = True
                        return
                    raise IotgwError(
                        f"InfluxDB has no database {db} and user {self.settings.influx_username} "
                        "may not create it: create it, or grant the user access to it"
                    ) from None
                if not exc.retriable:
                    raise IotgwError(
                        f"InfluxDB refused to create the database: {exc.reason[:200]}"
                    ) from None
                reason = exc.reason
            delay = _BACKOFF.delay(attempt)
            log.warning("influx_unavailable", error=reason, retry_in_s=delay)
            await asyncio.sleep(delay)

    async def _visible_databases(self) -> list[str]:
        try:
            return await self._influx.databases()
        except InfluxError:
            return []

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        flush_s = self.settings.writer_flush_interval_s
        size = self.settings.writer_batch_size
        first_at = 0.0
        while not stop.is_set():
            wait_ms = (
                flush_s * 1000
                if not self._buffer
                else max(0, (first_at + flush_s - time.monotonic()) * 1000)
            )
            batches = await consumer.getmany(
                timeout_ms=int(wait_ms), max_records=size - len(self._buffer)
            )
            for records in batches.values():
                if records and not self._buffer:
                    first_at = time.monotonic()
                self._buffer.extend(records)
            await self._update_lag(consumer)
            if self._buffer and (
                len(self._buffer) >= size or time.monotonic() - first_at >= flush_s
            ):
                await self._flush(consumer)
            await self._maybe_write_stats()
        if self._buffer:
            await self._flush(consumer)

    async def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        self._lag = await consumer_lag(consumer)
        self.metrics.lag.set(self._lag)

    async def _flush(self, consumer: AIOKafkaConsumer) -> None:
        """Write the buffer (retrying, bisecting 4xx), dead-letter refusals, commit offsets."""
        records, self._buffer = self._buffer, []
        encoded: list[Encoded] = []
        for record in records:
            try:
                encoded.append(self.encoder.encode(record))
            except (LineProtocolError, ValueError, KeyError, TypeError) as exc:
                await self._dead_letter(record, Reason.MALFORMED, f"cannot be a point: {exc}")
        await self._write(consumer, encoded)
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance gave the partitions to another writer, which reads them again
            # from the last commit: rewriting the same points is harmless.
            log.warning("commit_failed", error=describe_kafka_error(exc))

    async def _write(self, consumer: AIOKafkaConsumer, points: list[Encoded]) -> None:
        """Write the points; the ones InfluxDB refuses (found by halves) are dead letters."""
        await write_bisecting(points, functools.partial(self._post, consumer), self._refused)

    async def _post(self, consumer: AIOKafkaConsumer, points: Sequence[Encoded]) -> None:
        """POST the points until InfluxDB answers 2xx (returns) or 4xx (Refused)."""
        body = "\n".join(p.line for p in points).encode()
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                await self._influx.write(self.settings.influx_db, body)
                status, reason = 204, ""
            except InfluxError as exc:
                if not exc.retriable:
                    raise Refused(exc.reason) from None
                status, reason = exc.status, exc.reason
            if 200 <= status < 300:
                self._influx_ok = True
                self.metrics.write_seconds.observe(time.monotonic() - started)
                self.metrics.batches.inc()
                for kind, count in Counter(p.kind for p in points).items():
                    self.metrics.points.labels(kind).inc(count)
                self._written += len(points)
                if attempt:
                    consumer.resume(*consumer.assignment())
                    self.metrics.paused.set(0)
                    log.info("influx_recovered", attempts=attempt)
                return
            self._influx_ok = False
            delay = _BACKOFF.delay(attempt)
            log.warning(
                "influx_write_failed",
                status=status or "none",
                error=reason[:200],
                points=len(points),
                retry_in_s=delay,
            )
            self.metrics.retries.inc()
            if self._stop.is_set():
                raise _Stopped
            # Pause fetching, but keep polling so the group does not drop this writer.
            consumer.pause(*consumer.assignment())
            self.metrics.paused.set(1)
            await consumer.getmany(timeout_ms=int(delay * 1000))
            attempt += 1

    async def _refused(self, refused: Encoded, reason: str) -> None:
        record = refused.record
        if record.topic == self.topics.dead_letters:
            # A dead letter's own point was refused: log it, never loop it back.
            log.error("rejected_point_refused", offset=record.offset, error=reason)
            return
        await self._dead_letter(record, Reason.INFLUX_REJECTED, reason)

    async def _dead_letter(self, record: Any, reason: Reason, detail: str) -> None:
        assert self._producer is not None
        device_id = record.key.decode(errors="replace") if record.key else ""
        headers = dead_letter_headers(
            reason, detail, telemetry_topic(device_id), now_ms(), source_topic=record.topic
        )
        await self._producer.send_and_wait(
            self.topics.dead_letters, record.value, key=record.key, headers=headers
        )
        self.metrics.dead_letters.labels(reason.value).inc()
        log.warning("dead_letter", reason=reason, device_id=device_id, detail=detail[:200])

    async def _maybe_write_stats(self) -> None:
        """Record lag and progress in InfluxDB, for the fleet dashboard."""
        now = time.monotonic()
        if now - self._last_stats < _STATS_INTERVAL_S:
            return
        self._last_stats = now
        line = point(
            series_key(
                "iotgw_writer", {"host": socket.gethostname(), "group": self.settings.writer_group}
            ),
            {"lag": self._lag, "points_written": self._written},
            now_ms(),
        )
        with contextlib.suppress(InfluxError):
            await self._influx.write(self.settings.influx_db, line)

    async def _shutdown(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(self._consumer.stop(), 5)
            self._consumer = None
        if self._producer is not None:
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(self._producer.stop(), 5)
            self._producer = None
        await self.registry.stop()
        await self._influx.close()
        if self.health is not None:
            self.health.stop()
        log.info("writer_stopped", points_written=self._written)
