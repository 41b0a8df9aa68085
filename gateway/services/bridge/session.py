"""The ingestion bridge: one ordered MQTT session in, worker processes out to Kafka.

This process holds the MQTT session and the acknowledgement order (gateway.adapters.mqtt_session);
each message goes to the worker process that owns its device (a stable hash of the device
id the topic names, in our envelope's topic or a device source's), which validates it and
produces it to Kafka (gateway.services.bridge.worker). A
worker gets its devices' messages in arrival order and produces each partition's records
in order, so a device's readings reach its partition in the order it sent them. A
message's PUBACK leaves once Kafka acknowledged its records and every earlier message's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import structlog

from gateway.adapters.discovery import DiscoveryReader
from gateway.adapters.mqtt_session import Message, MqttSession, SessionOptions
from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.services.bridge.routing import device_of, worker_of
from gateway.services.bridge.worker import read_frame, write_frame
from gateway.services.runtime import BridgeMetrics, HealthServer
from gateway.settings import Settings
from gateway.topics import MQTT_STATUS_FILTER, MQTT_TELEMETRY_FILTER

__all__ = ["DRAIN_TIMEOUT_S", "Bridge"]

log = structlog.get_logger(__name__)

# SIGTERM must end the bridge within 10 s: this long for Kafka to acknowledge what is in
# flight, the rest for closing the connections and the workers.
DRAIN_TIMEOUT_S = 7.0
_WORKER_EXIT_S = 2.0


class Worker(Protocol):
    """What the session needs of a worker: start it, hand it messages, hear what it has
    done (`("done", indices, stats)` frames), stop it. A seam for tests."""

    number: int
    ready: bool

    async def start(self) -> None: ...

    def send(self, received_at: int, messages: list[tuple[int, str, bytes, int]]) -> None: ...

    def send_discovery(self, topic: str, payload: bytes) -> None: ...

    def frames(self) -> AsyncIterator[tuple[Any, ...]]: ...

    async def stop(self) -> None: ...


class WorkerProcess:
    """A worker process and this end of the socket to it."""

    def __init__(self, number: int, settings: Settings) -> None:
        self.number = number
        self._settings = settings
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.ready = False

    async def start(self) -> None:
        """Start the process and wait until it is ready; IotgwError with its reason if not."""
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.services.bridge.worker", str(theirs.fileno()),
                str(self.number), pass_fds=(theirs.fileno(),),
                env={**os.environ, **self._settings.environment()},
            )  # fmt: skip
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        # The worker gives up on Kafka and the registry within its own timeouts.
        frame = await read_frame(self._reader)
        if frame is None or frame[0] != "ready":
            reason = frame[1] if frame and frame[0] == "error" else await self._exit_reason()
            raise IotgwError(f"bridge worker {self.number} did not start: {reason}")
        self.ready = True

    def send(self, received_at: int, messages: list[tuple[int, str, bytes, int]]) -> None:
        assert self._writer is not None
        write_frame(self._writer, ("messages", received_at, messages))

    def send_discovery(self, topic: str, payload: bytes) -> None:
        assert self._writer is not None
        write_frame(self._writer, ("discovery", topic, payload))

    async def frames(self) -> AsyncIterator[tuple[Any, ...]]:
        """The worker's frames until it exits or fails: then IotgwError with the reason."""
        assert self._reader is not None
        while (frame := await read_frame(self._reader)) is not None:
            if frame[0] == "error":
                raise IotgwError(f"bridge worker {self.number} failed: {frame[1]}")
            yield frame
        raise IotgwError(f"bridge worker {self.number} exited: {await self._exit_reason()}")

    async def _exit_reason(self) -> str:
        assert self._process is not None
        try:
            code = await asyncio.wait_for(self._process.wait(), _WORKER_EXIT_S)
        except TimeoutError:
            return "it closed its socket"
        return f"exit code {code}" if code >= 0 else f"killed by signal {-code}"

    async def stop(self) -> None:
        """Close its input, which stops it; kill it if it does not exit in time."""
        if self._writer is not None:
            self._writer.close()
        if self._process is None or self._process.returncode is not None:
            return
        try:
            await asyncio.wait_for(self._process.wait(), _WORKER_EXIT_S + 0.5)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()


class Bridge:
    """`iotgw run bridge`: MQTT in, Kafka out, each message acknowledged after Kafka.

    The gateway's own flow control bounds the messages in flight to
    `IOTGW_MAX_IN_FLIGHT`: at the limit the session stops reading its socket, the broker
    keeps the backlog in the persistent session, and memory stays flat.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: BridgeMetrics | None = None,
        *,
        workers: Sequence[Worker] | None = None,
    ) -> None:
        """`workers` replaces the worker processes (tests); there are IOTGW_BRIDGE_WORKERS
        of those."""
        self.settings = settings
        self.metrics = metrics or BridgeMetrics()
        self.sources = settings.sources()
        settings.catalogue()  # a types file that cannot be used stops the bridge now
        holding = settings.unknown_devices == "hold" or self.sources.holding(
            settings.unknown_devices
        )
        if settings.mqtt_share_group and holding:
            # Each bridge of the group would replay the same held readings: twice, and after
            # the live ones the other bridge let through.
            raise IotgwError(
                "holding unknown devices (IOTGW_UNKNOWN_DEVICES or a source's unknown_devices: "
                "hold) needs one bridge per broker: unset IOTGW_MQTT_SHARE_GROUP",
                exit_code=2,
            )
        self.workers: Sequence[Worker] = workers or [
            WorkerProcess(n, settings) for n in range(settings.bridge_workers)
        ]
        homeassistant = self.sources.homeassistant
        self.discovery = (
            DiscoveryReader(
                settings.mqtt,
                homeassistant.config_filters,
                self._discovered,
                client_id=settings.mqtt_client_id,
                ca_file=settings.mqtt_ca_file,
                timeout_s=settings.timeout_s,
            )
            if homeassistant is not None
            else None
        )
        self.session = MqttSession(
            SessionOptions(
                endpoint=settings.mqtt,
                client_id=settings.mqtt_client_id,
                subscriptions=self.subscriptions,
                session_expiry_s=settings.mqtt_session_expiry_s,
                max_in_flight=settings.max_in_flight,
                ca_file=settings.mqtt_ca_file,
                timeout_s=settings.timeout_s,
            ),
            self._dispatch,
        )
        self.session.on_acknowledged = self.metrics.publish_seconds.observe
        self.session.on_unacknowledged = self.metrics.redeliveries.inc
        self.metrics.in_flight.set_function(lambda: self.session.in_flight)
        self.health: HealthServer | None = None
        # Devices awaiting approval, by worker (as each last said).
        self._pending_devices: dict[int, int] = {}
        self.metrics.pending_devices.set_function(lambda: sum(self._pending_devices.values()))
        # State topics unsubscribed because no entity has them (see _drop_if_stale).
        self._stale: set[str] = set()

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """Our envelope's filters (readings, availability) and the device sources' (Home
        Assistant's state topics are added as discovery names them)."""
        filters = (MQTT_TELEMETRY_FILTER, MQTT_STATUS_FILTER, *self.sources.filters)
        return tuple(self._shared(f) for f in filters)

    def _shared(self, topic_filter: str) -> str:
        """A filter as the bridge subscribes to it: in the share group, if one is set."""
        group = self.settings.mqtt_share_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    def readiness(self) -> dict[str, bool]:
        workers = all(worker.ready for worker in self.workers)
        return {
            "mqtt": self.session.connected and self.session.subscribed,
            "kafka": workers,
            "registry": workers,
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down gracefully; IotgwError if a part fails."""
        self.health = HealthServer.start_for(
            self.settings, "bridge", self.metrics.registry, self.readiness
        )
        tasks: list[asyncio.Task[None]] = []
        stopping = asyncio.create_task(stop.wait())
        try:
            # Start-up waits on Kafka, the registry and the broker, each up to
            # IOTGW_TIMEOUT_S; a SIGTERM meanwhile stops it at once.
            starting = asyncio.create_task(self._start(tasks))
            await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return
            starting.result()
            log.info(
                "bridge_started",
                client_id=self.settings.mqtt_client_id,
                subscriptions=",".join(self.session.subscriptions),
                workers=len(self.workers),
                max_in_flight=self.settings.max_in_flight,
                metrics=f"http://{self.settings.metrics_host}:{self.health.port}/metrics",
            )
            tasks.append(asyncio.create_task(self.session.run(), name="mqtt-session"))
            await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done() and (error := task.exception()) is not None:
                    raise error
        finally:
            stopping.cancel()
            await self._shutdown(tasks)

    async def _start(self, tasks: list[asyncio.Task[None]]) -> None:
        """Start the workers, follow them, then connect: a kept session's queued readings
        come at once, and only the workers' answers make room for more."""
        await asyncio.gather(*(worker.start() for worker in self.workers))
        tasks += [asyncio.create_task(self._follow(worker)) for worker in self.workers]
        if self.discovery is not None:
            # Every entity known before the first state message comes (see DiscoveryReader).
            await self.discovery.start()
        if self.settings.mqtt_share_group:
            log.warning(
                "shared_subscription",
                subscriptions=",".join(self.subscriptions),
                warning="per-device order holds only on a broker whose shared subscriptions are "
                "sticky per publisher (EMQX hash_clientid); Mosquitto's are not",
            )
        await self.session.connect()

    def _discovered(self, topic: str, payload: bytes) -> None:
        """A discovery config: learn it here (to route its state topics), tell every worker
        (before any later message), and follow the state topics it adds or removes."""
        homeassistant = self.sources.homeassistant
        assert homeassistant is not None
        change = homeassistant.learn(topic, payload)
        if change.problem:
            log.warning("discovery_config_skipped", topic=topic, reason=change.problem)
        for worker in self.workers:
            worker.send_discovery(topic, payload)
        self.session.subscribe([self._shared(f) for f in change.subscribe])
        self.session.unsubscribe([self._shared(f) for f in change.unsubscribe])
        self.metrics.discovered_entities.set(len(homeassistant.entities))
        self._stale.difference_update(change.subscribe)

    def _dispatch(self, messages: list[Message]) -> None:
        """Hand each message to the worker that owns its device, in arrival order."""
        received_at = now_ms()
        self.metrics.messages.inc(len(messages))
        workers, sources = self.workers, self.sources
        discovery = sources.homeassistant is not None
        if len(workers) == 1 and not discovery:
            workers[0].send(received_at, [(m.index, m.topic, m.payload, m.size) for m in messages])
            return
        shares: list[list[tuple[int, str, bytes, int]]] = [[] for _ in workers]
        for m in messages:
            device = device_of(m.topic, sources)
            if device is None and discovery:
                self._drop_if_stale(m.topic)
            number = worker_of(device or m.topic, len(workers)) if len(workers) > 1 else 0
            shares[number].append((m.index, m.topic, m.payload, m.size))
        for worker, share in zip(workers, shares, strict=True):
            if share:
                worker.send(received_at, share)

    def _drop_if_stale(self, topic: str) -> None:
        """Unsubscribe from a state topic no entity has any more: a kept session holds those
        of configs removed while the bridge was away. (Its message is a dead letter.)"""
        if topic in self._stale or self.sources.claims(topic):
            return
        self._stale.add(topic)
        log.info("stale_subscription_dropped", topic=topic)
        self.session.unsubscribe([topic], known=False)

    async def _follow(self, worker: Worker) -> None:
        """Acknowledge what the worker finished and count what it did."""
        metrics = self.metrics
        async for frame in worker.frames():
            if frame[0] != "done":
                continue
            _, done, stats = frame
            self.session.complete(done)
            metrics.readings.inc(stats["readings"])
            if published := stats["published"]:
                metrics.published.inc(published)
                metrics.backlog_age.set(max(0.0, (now_ms() - stats["newest_ts"]) / 1000))
            for reason, count in stats["rejected"].items():
                metrics.rejected.labels(reason).inc(count)
            if retries := stats["retries"]:
                metrics.kafka_retries.inc(retries)
            for source, count in stats["sources"].items():
                metrics.source_readings.labels(source).inc(count)
            for (source, field), count in stats["ignored"].items():
                metrics.ignored_fields.labels(source, field).inc(count)
            if availability := stats["availability"]:
                metrics.availability.inc(availability)
            for reason, count in stats["availability_ignored"].items():
                metrics.availability_ignored.labels(reason).inc(count)
            if held := stats["held"]:
                metrics.held.inc(held)
            self._pending_devices[worker.number] = stats["pending_devices"]

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        """Stop taking messages, let Kafka acknowledge what is in flight, then close."""
        session = self.session
        session.stop_reading()
        # Wait for what the workers hold, unless one has died (its messages never finish).
        if tasks and not any(task.done() for task in tasks):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.drained(), DRAIN_TIMEOUT_S)
        if session.in_flight:
            log.warning("shutdown_unacknowledged", messages=session.in_flight)
        session.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(worker.stop() for worker in self.workers))
        if self.discovery is not None:
            await self.discovery.stop()
        if self.health is not None:
            self.health.stop()
        log.info("bridge_stopped")
