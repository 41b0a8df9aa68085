"""A service's run loop and logging: Kafka errors it did not handle end it in one line;
one log line an event, logfmt or JSON."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from aiokafka.errors import TopicAuthorizationFailedError
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.errors import IotgwError
from gateway.services.runtime import (
    GC_YOUNG_THRESHOLD,
    LoopHistogram,
    configure_logging,
    route_logs_to_stdlib,
    serve,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level restored after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers, root.level = handlers, level
    route_logs_to_stdlib()


@pytest.fixture
def collector() -> Iterator[None]:
    """The garbage collector's thresholds and frozen objects restored after the test."""
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_an_unhandled_kafka_error_ends_the_service_in_one_line(
    root_logger: logging.Logger, collector: None
) -> None:
    """Not authorized for a topic: IotgwError (one line, exit code 1), not a traceback."""

    async def refused(stop: asyncio.Event) -> None:
        raise TopicAuthorizationFailedError()

    with pytest.raises(IotgwError, match=r"^Kafka failed for good: ") as error:
        serve(refused)
    assert error.value.exit_code == 1
    assert "\n" not in str(error.value)


def test_a_service_collects_young_objects_less_often_and_skips_what_it_loaded(
    collector: None,
) -> None:
    """serve() raises the youngest generation's threshold and freezes what is loaded."""

    async def nothing(stop: asyncio.Event) -> None:
        return None

    serve(nothing)
    assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD
    assert gc.get_freeze_count() > 0


def test_log_lines_are_logfmt_with_values_quoted(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line an event: `event=` first among the event's own keys, values with spaces
    quoted; the libraries' lines (plain logging) come out the same way."""
    configure_logging(logging.INFO)
    structlog.get_logger("gateway.test").warning("kafka_send_failed", error="no broker answered")
    logging.getLogger("aiokafka").warning("Got error %s", "x y")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert "level=warning logger=gateway.test event=kafka_send_failed" in lines[0]
    assert lines[0].endswith('error="no broker answered"')
    assert 'logger=aiokafka event="Got error x y"' in lines[1]


def test_log_lines_can_be_json(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    """IOTGW_LOG_FORMAT=json: one JSON object a line."""
    configure_logging(logging.INFO, "json")
    structlog.get_logger("gateway.test").info("bridge_started", workers=2)
    [line] = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert (event["event"], event["workers"], event["level"]) == ("bridge_started", 2, "info")


def test_loop_histogram_exports_what_prometheus_clients_histogram_does() -> None:
    """The same observations give the same buckets, count and sum as prometheus_client's."""
    buckets = (0.001, 0.01, 0.1, 1.0, 30.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("publish_seconds", "help", buckets, ours)
    reference = Histogram("publish_seconds", "help", buckets=buckets, registry=theirs)
    for value in (0.0005, 0.001, 0.002, 0.01, 0.5, 3.0, 0.1, 45.0):
        loop.observe(value)
        reference.observe(value)
    expected = [
        line for line in generate_latest(theirs).decode().splitlines() if "_created" not in line
    ]
    assert generate_latest(ours).decode().splitlines() == expected
