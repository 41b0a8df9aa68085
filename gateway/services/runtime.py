"""What every service runs on: its logging, its run loop (stopped by SIGINT or SIGTERM),
its Prometheus metrics and its `/healthz` and `/readyz` endpoints."""

from __future__ import annotations

import asyncio
import bisect
import gc
import itertools
import json
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
import uvloop
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from gateway.adapters.kafka import describe_kafka_error
from gateway.errors import IotgwError
from gateway.settings import LogFormat, ServiceName, Settings

__all__ = [
    "BridgeMetrics",
    "HealthServer",
    "LoopHistogram",
    "RulesMetrics",
    "StateMetrics",
    "WriterMetrics",
    "configure_logging",
    "route_logs_to_stdlib",
    "serve",
    "service_logging",
    "tune_gc",
]

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


# A service's run: until the event is set, then a graceful shutdown.
ServiceRun = Callable[[asyncio.Event], Awaitable[None]]


# Net allocations between two collections of the youngest generation (CPython: 700). A
# service allocates a few objects per reading, so at tens of thousands of readings a
# second the default collects hundreds of times a second; measured on the rules engine
# with 100 rules, 20,000 gives 27% more readings/s. The older generations keep theirs.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Leave what is loaded so far (modules, schemas) out of every collection, and
    collect the youngest generation less often."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def serve(service: ServiceRun, log_format: LogFormat = "logfmt") -> None:
    """Run `service` until SIGINT or SIGTERM, which start its graceful shutdown.

    A Kafka error the service did not handle is one retrying cannot fix (it retries the
    transient ones itself): it ends the service with IotgwError, one line, exit code 1.
    """
    service_logging(log_format)
    tune_gc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await service(stop)

    try:
        uvloop.run(main())
    except KafkaError as exc:
        raise IotgwError(f"Kafka failed for good: {describe_kafka_error(exc)}") from None


# What every log line gets, iotgw's and the libraries' alike.
_SHARED: list[structlog.types.Processor] = [
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def route_logs_to_stdlib() -> None:
    """iotgw's events (structlog) become records of the standard `logging` module, so one
    handler renders them with the libraries' lines (and pytest's caplog sees them)."""
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def configure_logging(level: int, log_format: LogFormat = "logfmt") -> None:
    """One line an event, to stderr: `timestamp`, `level`, `logger`, `event`, then the
    event's fields, as logfmt (a value with spaces or quotes is quoted) or as JSON. The
    libraries' own lines (aiokafka's warnings, say) go through the same renderer."""
    route_logs_to_stdlib()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.processors.LogfmtRenderer(
            key_order=["timestamp", "level", "logger", "event"], drop_missing=True
        )
    )
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_SHARED,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


def service_logging(log_format: LogFormat = "logfmt") -> None:
    """A service logs its events (INFO and up); of the clients, their warnings."""
    configure_logging(logging.INFO, log_format)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # gmqtt logs a traceback for every lost connection; the services log the event.
    logging.getLogger("gmqtt").setLevel(logging.ERROR)
    # One line per HTTP request to InfluxDB would drown the service's own events.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class LoopHistogram(Collector):
    """A histogram observed from one event loop only, exported like prometheus_client's.

    The bridge observes every message it acknowledges, tens of thousands a second;
    prometheus_client's Histogram takes a lock and updates two values per observation,
    a cost the size of the rest of the acknowledgement. Here an observation is one
    bisect and two additions on plain numbers; a scrape (from the metrics thread)
    copies the counts first, so the buckets it reports are consistent.
    """

    def __init__(
        self, name: str, documentation: str, buckets: Iterable[float], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = sorted(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts, total = list(self._counts), self._sum
        cumulative = list(itertools.accumulate(counts))
        buckets = [(_bound(b), c) for b, c in zip(self._bounds, cumulative, strict=False)]
        yield HistogramMetricFamily(
            self._name,
            self._documentation,
            buckets=[*buckets, ("+Inf", cumulative[-1])],
            sum_value=total,
        )


def _bound(value: float) -> str:
    """A bucket's `le` label as prometheus_client writes it: 1.0, 0.005, 30.0."""
    return repr(float(value))


class BridgeMetrics:
    """The bridge's metrics, in a registry of their own (several bridges may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "iotgw_bridge_messages_received", "MQTT messages received", registry=r
        )
        self.readings = Counter(
            "iotgw_bridge_readings_received", "readings received (a batch counts each)", registry=r
        )
        self.published = Counter(
            "iotgw_bridge_readings_published", "readings acknowledged by Kafka", registry=r
        )
        self.held = Counter(
            "iotgw_bridge_messages_held",
            "messages of unknown devices held for approval (acknowledged by Kafka)",
            registry=r,
        )
        self.pending_devices = Gauge(
            "iotgw_bridge_pending_devices",
            "devices whose messages are held for approval",
            registry=r,
        )
        self.availability = Counter(
            "iotgw_bridge_availability_published",
            "availability messages (online/offline) acknowledged by Kafka",
            registry=r,
        )
        self.availability_ignored = Counter(
            "iotgw_bridge_availability_ignored",
            "availability messages of devices neither registered nor pending, or disabled, "
            "or without a valid id (retained ones outlive their devices), by reason",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "iotgw_bridge_readings_rejected",
            "readings sent to the dead-letter topic (acknowledged by Kafka), by reason",
            ["reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "iotgw_bridge_in_flight",
            "MQTT messages awaiting Kafka, not yet acknowledged",
            registry=r,
        )
        self.publish_seconds = LoopHistogram(
            "iotgw_bridge_kafka_publish_seconds",
            "time from receiving a message to Kafka acknowledging all its records",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.backlog_age = Gauge(
            "iotgw_bridge_backlog_age_seconds",
            "age (device time) of the newest reading published; large while a backlog drains",
            registry=r,
        )
        self.kafka_retries = Counter(
            "iotgw_bridge_kafka_retries", "records sent to Kafka again after a failure", registry=r
        )
        self.source_readings = Counter(
            "iotgw_bridge_source_readings",
            "readings received by device source (envelope, zigbee2mqtt, tasmota, ...)",
            ["source"],
            registry=r,
        )
        self.ignored_fields = Counter(
            "iotgw_bridge_ignored_fields",
            "fields of device sources' messages not ingested (unmapped, or not of the "
            "device's type), by source and field",
            ["source", "field"],
            registry=r,
        )
        self.discovered_entities = Gauge(
            "iotgw_bridge_discovered_entities",
            "Home Assistant entities learned from discovery and read",
            registry=r,
        )
        self.redeliveries = Counter(
            "iotgw_bridge_unacknowledged_after_reconnect",
            "messages finished after their MQTT connection was lost; the broker sends them again",
            registry=r,
        )


class WriterMetrics:
    """The writer's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.points = Counter(
            "iotgw_writer_points_written", "points InfluxDB accepted, by measurement kind",
            ["kind"], registry=r,
        )  # fmt: skip
        self.batches = Counter(
            "iotgw_writer_batches_written", "write requests accepted", registry=r
        )
        self.write_seconds = Histogram(
            "iotgw_writer_write_seconds",
            "duration of one successful write request to InfluxDB",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.retries = Counter(
            "iotgw_writer_retries", "write requests retried after a 5xx, 429 or no answer",
            registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "iotgw_writer_dead_letters", "records sent to the dead-letter topic, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.lag = Gauge(
            "iotgw_writer_consumer_lag", "records in Kafka not yet written (all partitions)",
            registry=r,
        )  # fmt: skip
        self.paused = Gauge(
            "iotgw_writer_paused", "1 while consumption is paused because InfluxDB fails",
            registry=r,
        )  # fmt: skip


class RulesMetrics:
    """The rules engine's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.evaluated = Counter(
            "iotgw_rules_readings_evaluated", "readings the rules were evaluated on", registry=r
        )
        self.alerts = Counter(
            "iotgw_rules_alerts", "alerts sent to iot.alerts, by rule and state",
            ["rule", "state"], registry=r,
        )  # fmt: skip
        self.action_failures = Counter(
            "iotgw_rules_action_failures", "actions that failed after their retries, by kind",
            ["action"], registry=r,
        )  # fmt: skip
        self.late = Counter(
            "iotgw_rules_late_readings", "readings older than the grace allows, not evaluated",
            registry=r,
        )  # fmt: skip
        self.lag = Gauge(
            "iotgw_rules_consumer_lag", "readings in Kafka not yet evaluated", registry=r
        )


class StateMetrics:
    """The last-known state service's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.merged = Counter(
            "iotgw_state_records_merged", "records merged into the state, by topic kind",
            ["kind"], registry=r,
        )  # fmt: skip
        for kind in ("readings", "availability"):
            self.merged.labels(kind)
        self.skipped = Counter(
            "iotgw_state_records_skipped",
            "records that are not readings or availability records, skipped",
            registry=r,
        )
        self.written = Counter(
            "iotgw_state_states_written", "device states acknowledged by Kafka", registry=r
        )
        self.devices = Gauge("iotgw_state_devices", "devices with a state", registry=r)
        self.lag = Gauge("iotgw_state_consumer_lag", "records in Kafka not yet merged", registry=r)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log."""


class HealthServer:
    """Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (its parts are up).

    `checks` returns each part's readiness, e.g. {"mqtt": True, "kafka": True, ...};
    `/readyz` answers 200 when all are true, else 503, with the parts as JSON.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        checks: Callable[[], dict[str, bool]],
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._checks = checks
        try:
            self._server: WSGIServer = make_server(
                host, port, self._app, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise IotgwError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    @classmethod
    def start_for(
        cls,
        settings: Settings,
        service: ServiceName,
        registry: CollectorRegistry,
        checks: Callable[[], dict[str, bool]],
    ) -> HealthServer:
        """Serve a service's metrics and health on its configured host and port."""
        server = cls(settings.metrics_host, settings.metrics_port_for(service), registry, checks)
        server.start()
        return server

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            # prometheus_client's own app: content negotiation, gzip, ?name[] filters.
            body: Iterable[bytes] = self._metrics(environ, start_response)
            return body
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            parts = self._checks()
            status = "200 OK" if all(parts.values()) else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(parts).encode() + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /metrics, /healthz or /readyz\n"]
