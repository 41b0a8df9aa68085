"""The time-series writer: readings, availability, alerts and dead letters from Kafka into
InfluxDB."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from pydantic_core import from_json

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
from gateway.domain.lineprotocol import LineProtocolError, field_set, point, series_key
from gateway.errors import IotgwError
from gateway.services.registry import DeviceRegistry
from gateway.services.runtime import HealthServer, WriterMetrics
from gateway.settings import Settings
from gateway.topics import Topics, telemetry_topic
from schemas import Device

__all__ = ["WRITES_IN_FLIGHT", "InOrderCommits", "PointEncoder", "Writer"]

log = structlog.get_logger(__name__)

_BACKOFF = Backoff(first=0.5, cap=15.0)
# How often the writer records its own lag and progress in InfluxDB (for the dashboards).
_STATS_INTERVAL_S = 10.0
# Batches written at once, each on a keep-alive connection of its own: InfluxDB parses
# and stores one while the writer reads and encodes the next (see simulators/bench/writer.py).
WRITES_IN_FLIGHT = 3
# While every write slot is busy, how long to wait for the oldest before looking again
# (at the stop flag, and at writes being retried).
_POLL_WHILE_WAITING_S = 1.0


# A Kafka record and its point, as one line of line protocol.
Encoded = tuple[Any, str]


class PointEncoder:
    """Turns records of iot.readings, iot.availability, iot.alerts and iot.readings.dlq into
    points.

    - readings: measurement = the device type; tags device_id, site, room (from the
      registry); fields = the metrics, plus `seq` (integer) when the reading has one;
      time = the device's `ts`.
    - availability: measurement `availability`; tags device_id, site, room (registry) and
      source; field online (a boolean); time = the record's `ts` (when the bridge got it).
    - alerts: measurement `alerts`; tags rule, device_id, state, site, room; fields
      value (a float; booleans as 1.0/0.0) and message; time = the alert's `ts`.
    - dead letters: measurement `rejected`; tags reason, device_id; fields detail and
      bytes; time = when the bridge received it.
    """

    def __init__(self, topics: Topics, lookup: Any) -> None:
        self._lookup = lookup
        self._series: dict[tuple[str, str, str | None, str | None], str] = {}
        self._by_topic: dict[str, Callable[[Any], str]] = {
            topics.readings: self._reading,
            topics.availability: self._availability,
            topics.alerts: self._alert,
        }

    def encode(self, record: Any) -> str:
        """One point, or LineProtocolError / ValueError when the record cannot be one."""
        return self.for_topic(record.topic)(record)

    def for_topic(self, topic: str) -> Callable[[Any], str]:
        """The encoding of the records of `topic` (a batch looks it up once a partition)."""
        return self._by_topic.get(topic, self._rejected)

    def _tags(self, device_id: str) -> tuple[str | None, str | None]:
        device: Device | None = self._lookup(device_id)
        return (device.site, device.room) if device is not None else (None, None)

    def _reading(self, record: Any) -> str:
        reading = from_json(record.value)
        device_id, measurement = reading["device_id"], reading["type"]
        site, room = self._tags(device_id)
        cache_key = (measurement, device_id, site, room)
        series = self._series.get(cache_key)
        if series is None:
            tags = {"device_id": device_id, "site": site, "room": room}
            series = self._series[cache_key] = series_key(measurement, tags)
        metrics = reading["metrics"]
        if type(metrics) is not dict:
            raise LineProtocolError("the metrics are not an object")
        seq = reading.get("seq")
        if seq is None:
            fields = field_set(metrics)
        elif "seq" in metrics:
            fields = field_set({**metrics, "seq": int(seq)})
        else:
            fields = f"{field_set(metrics)},seq={int(seq)}i"
        return f"{series} {fields} {int(reading['ts'])}"

    def _availability(self, record: Any) -> str:
        availability = from_json(record.value)
        online = availability["online"]
        if type(online) is not bool:
            raise LineProtocolError("online is not a boolean")
        device_id = availability["device_id"]
        site, room = self._tags(device_id)
        source = availability.get("source")
        tags = {"device_id": device_id, "site": site, "room": room, "source": source}
        return point(series_key("availability", tags), {"online": online}, availability["ts"])

    def _alert(self, record: Any) -> str:
        alert = from_json(record.value)
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


Offsets = dict[TopicPartition, int]


class InOrderCommits:
    """Batches being written at once, and what may be committed: the offsets of the
    batches that are written and of every batch read before them, never one overtaking."""

    def __init__(self) -> None:
        self._batches: deque[tuple[asyncio.Task[None], Offsets]] = deque()

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, write: asyncio.Task[None], offsets: Offsets) -> None:
        """A batch whose `write` started, read after every batch added before it."""
        self._batches.append((write, offsets))

    def written(self) -> Offsets:
        """The offsets to commit now (empty if none): the batches written without a break
        from the oldest; the first of them that failed raises its exception."""
        offsets: Offsets = {}
        while self._batches and self._batches[0][0].done():
            write, done = self._batches.popleft()
            write.result()
            for tp, offset in done.items():
                offsets[tp] = max(offsets.get(tp, 0), offset)
        return offsets

    async def wait_oldest(self, timeout_s: float | None) -> None:
        """Until the oldest batch is written or failed, or `timeout_s` has passed."""
        if self._batches:
            await asyncio.wait([self._batches[0][0]], timeout=timeout_s)

    def cancel(self) -> None:
        """Stop every write; none of them is committed."""
        for write, _ in self._batches:
            write.cancel()
        self._batches.clear()


class Writer:
    """`iotgw run writer`: consumer group `iotgw-writer`, batches into InfluxDB (1.x's
    `/write`, or 2.x's bucket through influxdb-client).

    A batch is written when it holds `writer_batch_size` points or is
    `writer_flush_interval_s` old; up to WRITES_IN_FLIGHT batches are written at once, each
    on a keep-alive connection of its own. Offsets are committed only after InfluxDB
    answered 2xx for every record before them. On 5xx, 429, timeouts or no connection the
    same batch is retried with capped exponential backoff while consumption is paused. A
    point refused with a 4xx goes to the dead-letter topic (`influx_rejected`); the rest is
    written. Replays are harmless: a point with the same series and time is overwritten.
    """

    def __init__(self, settings: Settings, metrics: WriterMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or WriterMetrics()
        self.topics = Topics(settings.topic_prefix)
        self.registry = DeviceRegistry(settings)
        self.encoder = PointEncoder(self.topics, self.registry.get)
        self._kinds = {
            self.topics.readings: "readings",
            self.topics.availability: "availability",
            self.topics.alerts: "alerts",
            self.topics.dead_letters: "rejected",
        }
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._influx = InfluxClient.for_settings(settings)
        self._influx_ok = False
        self._writes = InOrderCommits()
        # Writes waiting to be retried: while there is one, consumption is paused.
        self._retrying = 0
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
                    self.topics.availability,
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
                version=2 if self._influx.v2 else 1,
                db=self.settings.influx_database,
                batch=self.settings.writer_batch_size,
                writes_in_flight=WRITES_IN_FLIGHT,
                flush_s=self.settings.writer_flush_interval_s,
                metrics=f"http://{self.settings.metrics_host}:{self.health.port}/metrics",
            )
            await self._consume(self._consumer, stop)
        except _Stopped:
            log.warning("stopped_while_influx_failing", note="uncommitted records are read again")
        finally:
            self._writes.cancel()
            await self._shutdown()

    async def _ensure_database(self) -> None:
        """Wait while InfluxDB is not ready; then, on 1.x, create the database (idempotent),
        and on 2.x check that the token may write to the bucket (an empty write).

        A 1.x user without admin rights may not create databases (403); it may write to
        one that exists, which is how a deployment with authentication is set up. A 2.x
        token needs write access to the bucket and nothing more; the bucket is made by
        `iotgw influx setup`. A refused login or token, or no bucket, stops the writer
        with one line: what is wrong will not mend itself.
        """
        db = self.settings.influx_database
        for attempt in itertools.count():
            try:
                if not await self._influx.ping():
                    raise InfluxError(f"InfluxDB at {self._influx.url} is not ready", 0)
                if self._influx.v2:
                    await self._influx.write(db, b"")
                else:
                    await self._influx.create_database(db)
                self._influx_ok = True
                return
            except InfluxError as exc:
                self._refuse_to_start(exc)
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

    def _refuse_to_start(self, exc: InfluxError) -> None:
        """IotgwError for what stops the writer at its start: a refused login or token;
        on 2.x, a bucket it may not write to or that does not exist."""
        reason = exc.reason[:200]
        if exc.status == 401:
            login = "token" if self._influx.v2 else "login"
            raise IotgwError(f"InfluxDB refused the {login}: {reason}") from None
        if self._influx.v2 and exc.status in (403, 404):
            raise IotgwError(
                f"the token may not write to bucket {self.settings.influx_database} of "
                f"organisation {self.settings.influx_org}: {reason} (`iotgw influx setup` "
                "makes the bucket; the token needs write access to it)"
            ) from None

    async def _visible_databases(self) -> list[str]:
        try:
            return await self._influx.databases()
        except InfluxError:
            return []

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        flush_s = self.settings.writer_flush_interval_s
        size = self.settings.writer_batch_size
        points: list[Encoded] = []
        offsets: Offsets = {}
        first_at = 0.0
        while not stop.is_set():
            await self._commit(consumer, self._writes.written())
            if self._retrying or len(self._writes) >= WRITES_IN_FLIGHT:
                await self._wait_for_writes(consumer)
                continue
            if consumer.paused():
                consumer.resume(*consumer.paused())
                self.metrics.paused.set(0)
            wait_ms = (
                flush_s * 1000
                if not offsets
                else max(0, (first_at + flush_s - time.monotonic()) * 1000)
            )
            batches = await consumer.getmany(
                timeout_ms=int(wait_ms), max_records=size - len(points)
            )
            if batches and not offsets:
                first_at = time.monotonic()
            for tp, records in batches.items():
                await self._encode(records, self.encoder.for_topic(tp.topic), points)
                offsets[tp] = records[-1].offset + 1
            await self._update_lag(consumer)
            if offsets and (len(points) >= size or time.monotonic() - first_at >= flush_s):
                self._start_write(points, offsets)
                points, offsets = [], {}
            await self._maybe_write_stats()
        if offsets:
            self._start_write(points, offsets)
        while self._writes:
            await self._writes.wait_oldest(None)
            await self._commit(consumer, self._writes.written())

    async def _encode(
        self, records: list[Any], encode: Callable[[Any], str], points: list[Encoded]
    ) -> None:
        """Append the records' points; one that cannot be a point is a dead letter."""
        append = points.append
        for record in records:
            try:
                append((record, encode(record)))
            except (LineProtocolError, ValueError, KeyError, TypeError) as exc:
                await self._dead_letter(record, Reason.MALFORMED, f"cannot be a point: {exc}")

    def _start_write(self, points: list[Encoded], offsets: Offsets) -> None:
        """Write the batch in a task of its own; its offsets are committed in order."""
        write = write_bisecting(points, self._post, self._refused)
        self._writes.add(asyncio.ensure_future(write), offsets)

    async def _wait_for_writes(self, consumer: AIOKafkaConsumer) -> None:
        """Wait for the oldest write; while writes are retried, consumption is paused but
        the consumer keeps polling, so the group does not drop this writer."""
        if self._retrying:
            consumer.pause(*consumer.assignment())
            self.metrics.paused.set(1)
            await consumer.getmany(timeout_ms=0)
        await self._writes.wait_oldest(_POLL_WHILE_WAITING_S)

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: Offsets) -> None:
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance gave the partitions to another writer, which reads them again
            # from the last commit: rewriting the same points is harmless.
            log.warning("commit_failed", error=describe_kafka_error(exc))

    async def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        self._lag = await consumer_lag(consumer)
        self.metrics.lag.set(self._lag)

    async def _post(self, points: Sequence[Encoded]) -> None:
        """POST the points until InfluxDB answers 2xx (returns) or 4xx (Refused)."""
        body = "\n".join([line for _, line in points]).encode()
        attempt = 0
        try:
            while True:
                started = time.monotonic()
                try:
                    await self._influx.write(self.settings.influx_database, body)
                    status, reason = 204, ""
                except InfluxError as exc:
                    if not exc.retriable:
                        raise Refused(exc.reason) from None
                    status, reason = exc.status, exc.reason
                if 200 <= status < 300:
                    self._written_ok(points, time.monotonic() - started)
                    if attempt:
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
                if not attempt:
                    # The consuming loop pauses consumption while any write is retried.
                    self._retrying += 1
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            if attempt:
                self._retrying -= 1

    def _written_ok(self, points: Sequence[Encoded], seconds: float) -> None:
        """Count an accepted write: one update a metric, whatever the number of points."""
        self._influx_ok = True
        self.metrics.write_seconds.observe(seconds)
        self.metrics.batches.inc()
        kinds = self._kinds
        for topic, count in Counter(record.topic for record, _ in points).items():
            self.metrics.points.labels(kinds.get(topic, "rejected")).inc(count)
        self._written += len(points)

    async def _refused(self, refused: Encoded, reason: str) -> None:
        record = refused[0]
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
            await self._influx.write(self.settings.influx_database, line)

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
