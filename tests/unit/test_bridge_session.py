"""The bridge's session process with in-memory workers and a scripted broker: each device
to its worker, in arrival order; PUBACKs in arrival order whichever worker finishes first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.domain.sources import parse_sources
from gateway.services.bridge.routing import owner
from gateway.services.bridge.session import Bridge
from gateway.settings import Settings
from tests.raw_mqtt import ScriptedBroker, publish
from tests.support import running, until

pytestmark = pytest.mark.unit


class MemoryWorker:
    """A worker in memory: keeps what it is sent; the test says when Kafka has it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.ready = False
        self.received: list[tuple[int, str, bytes, int]] = []
        self.configs: list[tuple[str, bytes]] = []
        self._frames: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    async def start(self) -> None:
        self.ready = True

    def send(self, received_at: int, messages: list[tuple[int, str, bytes, int]]) -> None:
        self.received += messages

    def send_discovery(self, topic: str, payload: bytes) -> None:
        self.configs.append((topic, payload))

    def finish(self, indices: list[int]) -> None:
        stats = {
            "readings": len(indices), "published": len(indices), "rejected": {}, "retries": 0,
            "newest_ts": 0, "sources": {}, "ignored": {}, "availability": 0,
            "availability_ignored": {}, "held": 0, "pending_devices": 0,
        }  # fmt: skip
        self._frames.put_nowait(("done", indices, stats))

    async def frames(self) -> AsyncIterator[tuple[Any, ...]]:
        while True:
            yield await self._frames.get()

    async def stop(self) -> None:
        self.ready = False


def devices_of_each_worker(workers: int, each: int) -> list[list[str]]:
    """Device ids that the stable hash gives to each worker."""
    found: list[list[str]] = [[] for _ in range(workers)]
    n = 0
    while any(len(ids) < each for ids in found):
        device = f"dev-{n}"
        if len(found[owner(f"devices/{device}/telemetry", workers)]) < each:
            found[owner(f"devices/{device}/telemetry", workers)].append(device)
        n += 1
    return found


async def test_each_worker_gets_its_devices_and_pubacks_keep_arrival_order() -> None:
    """Readings of four devices alternate; worker 1 finishes all its messages before
    worker 0 finishes any: no PUBACK leaves until the first message is done, then they
    leave in the order the PUBLISH packets came."""
    [zero, one] = devices_of_each_worker(2, 2)
    order = [zero[0], one[0], zero[1], one[1]] * 5
    workers = [MemoryWorker(0), MemoryWorker(1)]
    async with ScriptedBroker() as broker:
        settings = Settings(
            mqtt_url=SecretStr(f"mqtt://127.0.0.1:{broker.port}"),
            mqtt_client_id="bridge-under-test",
            metrics_port=0,
        )
        bridge = Bridge(settings, workers=workers)
        published = bridge.metrics.published
        async with running(bridge):
            connection = await broker.connection(0)
            connection.send(
                b"".join(
                    publish(f"devices/{device}/telemetry", b"{}", number)
                    for number, device in enumerate(order, start=1)
                )
            )
            await until(lambda: len(workers[0].received) + len(workers[1].received) == 20, 5)
            workers[1].finish([index for index, *_ in workers[1].received])
            await until(lambda: published._value.get() == 10, 5, "worker 1's done frames")
            # Acknowledging is synchronous with the done frame: none was due.
            assert bridge.session.in_flight == 20
            workers[0].finish([index for index, *_ in workers[0].received])
            await until(lambda: len(connection.acks) == 20, 5, "every PUBACK")
    assert connection.acks == list(range(1, 21))
    for worker, mine in zip(workers, (zero, one), strict=True):
        topics = [topic for _, topic, _, _ in worker.received]
        assert topics == [f"devices/{d}/telemetry" for d in order if d in mine]
        indices = [index for index, *_ in worker.received]
        assert indices == sorted(indices)


def test_a_device_s_status_goes_to_the_worker_of_its_readings() -> None:
    """`devices/{id}/status` and a source's availability topic route like the device's readings."""
    sources = parse_sources("sources:\n  - {adapter: tasmota}\n")
    for device in ("plug-1", "hall", "tasmota_0A1B2C"):
        assert owner(f"devices/{device}/status", 7) == owner(f"devices/{device}/telemetry", 7)
    assert owner("tele/tasmota_0A1B2C/LWT", 7, sources) == owner(
        "tele/tasmota_0A1B2C/SENSOR", 7, sources
    )
