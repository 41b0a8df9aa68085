"""Shared fixtures: the local stack for the whole session, and unique names per test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from devstack import stack
from gateway.services.runtime import route_logs_to_stdlib
from gateway.settings import Settings

# In-process services log through the standard logging module, which pytest captures.
route_logs_to_stdlib()


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses: topics, client ids, databases."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def local_stack() -> Iterator[stack.StackPlan]:
    """The default local stack, brought up once (or reused when it already runs).

    Servers this session started are stopped at its end; ones that already ran are left.
    """
    plan = stack.StackPlan()
    report = asyncio.run(stack.up(plan, stack_settings(plan), report=print))
    yield plan
    if report.started:
        stack.down(plan.root, only=set(report.started))


def stack_settings(plan: stack.StackPlan, **overrides: object) -> Settings:
    """Settings that point at `plan`'s servers, whatever the environment says."""
    values: dict[str, object] = {
        "mqtt_url": plan.mqtt_url,
        "kafka_bootstrap": plan.kafka_bootstrap,
        "influx_url": plan.influx_url,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(local_stack: stack.StackPlan) -> Settings:
    """Settings for the session's stack."""
    return stack_settings(local_stack)


@pytest.fixture(scope="session")
def influxdb2_stack() -> Iterator[stack.StackPlan]:
    """InfluxDB 2.7 (built once, cached) beside the stack's 1.6.7, for the tests that run
    against both; stopped at the end if this session started it."""
    plan = stack.INFLUXDB2_BESIDE
    report = asyncio.run(stack.up(plan, stack_settings(plan), report=print))
    yield plan
    if report.started:
        stack.down(plan.root, only=set(report.started))


@pytest.fixture(params=[1, 2], ids=["influxdb1.6", "influxdb2.7"])
def any_influx(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The session's settings, pointed at InfluxDB 1.6.7 and then at 2.7 (with the org
    and token of its setup)."""
    if request.param == 1:
        return settings
    plan = request.getfixturevalue("influxdb2_stack")
    return stack.influx_settings(plan, settings)
