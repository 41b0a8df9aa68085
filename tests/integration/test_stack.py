"""`iotgw stack` and `iotgw topics`: real servers up, reused, reported, stopped; clear errors."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import NodeNotReadyError
from gmqtt import Client

from devstack import stack
from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import broker_ids, create_producer, kafka_admin
from gateway.adapters.mqtt import publish_in_window
from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.settings import Settings
from gateway.topics import Topics
from simulators.processes import free_ports
from tests.conftest import stack_settings, unique
from tests.integration.test_servers import consume
from tests.support import until

T = TypeVar("T")

pytestmark = pytest.mark.integration

IOTGW = [sys.executable, "-m", "gateway"]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `iotgw ARGS` as a user would, in a subprocess, with extra environment."""
    return subprocess.run(
        [*IOTGW, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_status_lists_every_server_up(local_stack: stack.StackPlan) -> None:
    """`iotgw stack status` shows Mosquitto, Kafka and InfluxDB up with their pids."""
    result = run_cli("stack", "status", "--dir", str(local_stack.root))
    assert result.returncode == 0, result.stderr
    for server in stack.status(local_stack.root):
        assert server.up
        assert server.pid is not None
        line = next(line for line in result.stdout.splitlines() if server.name in line)
        assert str(server.pid) in line
        assert server.address in line
        assert "up" in line


async def test_second_up_reuses_running_servers_and_installs_nothing(
    local_stack: stack.StackPlan, settings: Settings
) -> None:
    """Bringing up a running stack starts nothing, fetches nothing, and still checks each server."""
    said: list[str] = []
    report = await stack.up(local_stack, settings, report=said.append)
    assert report.started == []
    assert all(server.up for server in report.servers)
    assert not [line for line in said if line.startswith(("installing", "fetching"))]
    assert len([line for line in said if "already running" in line]) == len(report.servers)


async def test_topics_are_created_with_design_settings(settings: Settings) -> None:
    """The stack made iotgw's topics: readings with 6 partitions, the registry compacted."""
    topics = Topics(settings.topic_prefix)
    async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
        described = {t["topic"]: t for t in await admin.describe_topics([topics.readings])}
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics.devices, {"cleanup.policy": None})]
        )
    assert len(described[topics.readings]["partitions"]) == 6
    entries = configs[0].resources[0][4]
    assert [(name, value) for name, value, *_ in entries] == [("cleanup.policy", "compact")]


def test_topics_create_is_idempotent(local_stack: stack.StackPlan) -> None:
    """`iotgw topics create` twice: the second run reports every topic as existing."""
    prefix = unique("t").replace("-", "")
    env = {"IOTGW_TOPIC_PREFIX": prefix, "IOTGW_KAFKA_BOOTSTRAP": local_stack.kafka_bootstrap}
    first = run_cli("topics", "create", **env)
    second = run_cli("topics", "create", **env)
    assert first.returncode == 0, first.stderr
    every = len(Topics(prefix).specs())
    assert first.stdout.count("created") == every == 8
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("exists") == every
    assert f"{prefix}.readings.dlq" in second.stdout


def test_topic_replication_waits_for_enough_brokers(local_stack: stack.StackPlan) -> None:
    """IOTGW_TOPIC_REPLICATION=2 on a one-broker cluster: after IOTGW_TIMEOUT_S, one line
    naming the setting and the brokers there are; nothing is created."""
    prefix = unique("t").replace("-", "")
    result = run_cli(
        "topics", "create", IOTGW_TOPIC_PREFIX=prefix, IOTGW_TOPIC_REPLICATION="2",
        IOTGW_KAFKA_BOOTSTRAP=local_stack.kafka_bootstrap, IOTGW_TIMEOUT_S="2",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "iotgw: error: IOTGW_TOPIC_REPLICATION=2 needs 2 brokers; Kafka has 1 after 2 s"
    ]


def test_unreachable_kafka_is_one_line_within_timeout() -> None:
    """A closed Kafka port gives one error line and exit 1, not a traceback or a hang."""
    port = free_ports(1)
    result = run_cli(
        "topics", "create", IOTGW_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}", IOTGW_TIMEOUT_S="3"
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"iotgw: error: Kafka is unreachable at 127.0.0.1:{port}")


def test_bad_settings_stop_a_command_with_one_line_per_field() -> None:
    """Invalid variables are each named on a line; the command exits 2 without a traceback."""
    result = run_cli(
        "topics", "create", IOTGW_READINGS_PARTITIONS="0", IOTGW_INFLUX_URL="not a url"
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert any("IOTGW_READINGS_PARTITIONS" in line for line in lines)
    assert any("IOTGW_INFLUX_URL" in line for line in lines)
    assert "Traceback" not in result.stderr


async def test_port_in_use_is_reported(tmp_path: Path) -> None:
    """A port taken by another process stops `stack up` with a line naming port and server."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        # The squatter's port may be high in the ephemeral range, where port + 7000 (the
        # TLS listener's default) is no port: give that one its own.
        plan = stack.StackPlan(
            tmp_path / "stack", mqtt_port=port, mqtts_port=free_ports(1), kinds=("mosquitto",)
        )
        with pytest.raises(IotgwError, match=f"port {port} for mosquitto is already in use"):
            await stack.up(plan, Settings())
    assert stack.status(plan.root) == [] or not any(s.up for s in stack.status(plan.root))


# The first run on a machine builds influxd (about 5 minutes with cold caches).
@pytest.mark.timeout(900)
async def test_influxdb2_is_set_up_once_and_serves_influxql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """InfluxDB 2.7 alone: healthy, its token owner-only and kept across `up`s, a written
    point read back with InfluxQL, 1.x refused while it runs, stopped by `down` with SIGINT."""
    plan = stack.StackPlan(
        tmp_path / "stack", influx_port=free_ports(1), kinds=("influxdb",), influx_version=2
    )
    said: list[str] = []
    await stack.up(plan, stack_settings(plan), report=said.append)
    try:
        async with httpx.AsyncClient(base_url=plan.influx_url) as http:
            health = (await http.get("/health")).json()
        assert (health["status"], health["version"]) == ("pass", "2.7.12")
        for secret in (plan.influx_token_file, plan.influx_password_file):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        token = plan.influx_token()
        assert [line for line in said if line.startswith("set up InfluxDB 2")]

        settings = stack.influx_settings(plan, stack_settings(plan))
        bucket = stack_settings(plan).influx_database
        assert (settings.influx_org, settings.influx_bucket) == ("iotgw", bucket)
        measurement, at = unique("probe").replace("-", "_"), now_ms()
        query = f'SELECT "temperature_c" FROM "{measurement}"'
        async with InfluxClient.for_settings(settings) as influx:
            await influx.write(bucket, f"{measurement},device_id=d1 temperature_c=21.5 {at}")
            assert await influx.rows(query, db=bucket) == [[at, 21.5]]

        again: list[str] = []
        report = await stack.up(plan, stack_settings(plan), report=again.append)
        assert report.started == []
        assert plan.influx_token() == token
        assert not [line for line in again if line.startswith(("set up", "building"))]

        with pytest.raises(IotgwError, match=r"InfluxDB 2 is running .* --influxdb 1"):
            await stack.up(
                stack.StackPlan(plan.root, influx_port=plan.influx_port, kinds=("influxdb",)),
                stack_settings(plan),
            )

        sent: list[tuple[int, int]] = []
        kill = os.kill

        def recorded_kill(pid: int, sig: int) -> None:
            sent.append((pid, sig))
            kill(pid, sig)

        [server] = stack.status(plan.root)
        monkeypatch.setattr(os, "kill", recorded_kill)
        assert stack.down(plan.root) == ["influxdb"]
        assert sent == [(server.pid, signal.SIGINT)]
        assert not any(s.up or s.pid for s in stack.status(plan.root))
    finally:
        monkeypatch.undo()
        stack.down(plan.root, purge=True)


async def test_mosquitto_keeps_a_large_backlog_across_a_restart(tmp_path: Path) -> None:
    """A persistent session's 2,500 queued readings (past the default cap of 1,000) survive
    a broker restart and are all delivered, in order, when the client returns."""
    plan = stack.StackPlan(tmp_path / "stack", mqtt_port=free_ports(1), kinds=("mosquitto",))
    settings = stack_settings(plan)
    await stack.up(plan, settings)
    try:
        endpoint, topic, client_id = settings.mqtt, f"test/{unique('backlog')}", unique("gw")
        total = 2500

        async def session(sink: list[bytes]) -> Client:
            client = Client(client_id, clean_session=False, session_expiry_interval=3600)
            subscribed = asyncio.Event()

            def on_message(*args: Any) -> int:
                sink.append(args[2])
                return 0

            client.on_message = on_message
            client.on_subscribe = lambda *args: subscribed.set()
            await client.connect(endpoint.host, endpoint.port)
            client.subscribe(topic, qos=1)
            await asyncio.wait_for(subscribed.wait(), 10)
            return client

        offline = await session([])
        await offline.disconnect()

        # A second subscriber sees what the broker accepted: once it has everything,
        # the broker has queued everything for the offline session too.
        witness_got: list[bytes] = []
        witness = await _subscriber(endpoint.host, endpoint.port, topic, witness_got)
        publisher = Client(unique("device"))
        await publisher.connect(endpoint.host, endpoint.port)
        for i in range(total):
            await publish_in_window(publisher, topic, str(i).encode())
        await until(lambda: len(witness_got) == total, 30)
        await publisher.disconnect()
        await witness.disconnect()

        stack.down(plan.root)
        await stack.up(plan, settings)

        delivered: list[bytes] = []
        returning = await session(delivered)
        await until(lambda: len(delivered) >= total, 30)
        await returning.disconnect()
        assert delivered == [str(i).encode() for i in range(total)]
    finally:
        stack.down(plan.root, purge=True)


async def _subscriber(host: str, port: int, topic: str, sink: list[bytes]) -> Client:
    client = Client(unique("witness"))
    subscribed = asyncio.Event()

    def on_message(*args: Any) -> int:
        sink.append(args[2])
        return 0

    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    await client.connect(host, port)
    client.subscribe(topic, qos=1)
    await asyncio.wait_for(subscribed.wait(), 10)
    return client


async def test_three_broker_cluster_serves_on_after_a_broker_is_killed(tmp_path: Path) -> None:
    """Three nodes report three brokers; with the leader of a replicated partition
    killed (-9), acks=all writes go on and nothing written before is lost."""
    plan = stack.StackPlan(
        tmp_path / "cluster", kafka_port=free_ports(3), kafka_brokers=3, kinds=("kafka",)
    )
    settings = stack_settings(plan)
    await stack.up(plan, settings)
    try:
        assert await broker_ids(plan.kafka_bootstrap, 10) == [1, 2, 3]
        topic = unique("replicated")
        async with kafka_admin(plan.kafka_bootstrap, 10) as admin:
            await _until_nodes_ready(lambda: admin.create_topics([NewTopic(topic, 1, 3)]))
            leader = await _leader(admin, topic)

        producer = create_producer(settings, request_timeout_ms=30000)
        await producer.start()
        try:
            for i in range(50):
                await producer.send_and_wait(topic, f"before {i}".encode(), key=b"d")
            pids = {s.name: s.pid for s in stack.status(plan.root)}
            victim = pids[f"kafka-{leader}"]
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            for i in range(50):
                await producer.send_and_wait(topic, f"after {i}".encode(), key=b"d")
        finally:
            await producer.stop()

        survivors = ",".join(
            f"127.0.0.1:{plan.kafka_port + n - 1}" for n in (1, 2, 3) if n != leader
        )
        records = await consume(
            settings.model_copy(update={"kafka_bootstrap": survivors}), topic, 100
        )
        assert [r.value for r in records] == [f"before {i}".encode() for i in range(50)] + [
            f"after {i}".encode() for i in range(50)
        ]
        assert await broker_ids(survivors, 10) == sorted({1, 2, 3} - {leader})
    finally:
        stack.down(plan.root, purge=True)


async def _until_nodes_ready(request: Callable[[], Awaitable[T]]) -> T:
    """Send an admin request, again while the node it picked is still being connected to
    (just after the cluster started, aiokafka may pick a node it has no connection to yet)."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await request()
            except NodeNotReadyError:
                await asyncio.sleep(0.2)


async def _leader(admin: Any, topic: str) -> int:
    """The leader of partition 0, once every broker's metadata knows it."""
    async with asyncio.timeout(30):
        while True:
            described = await _until_nodes_ready(lambda: admin.describe_topics([topic]))
            partitions = described[0]["partitions"]
            if partitions and partitions[0]["leader"] >= 0:
                return int(partitions[0]["leader"])
            await asyncio.sleep(0.1)
