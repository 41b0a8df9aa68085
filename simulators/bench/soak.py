"""The soak run (`make soak`): the bridge and the writer under a steady load for minutes,
watched over time. Not part of `make test`.

Against the local stack, loopback only, on topics and a database of its own: readings of
the simulator's fleet at a fixed rate (QoS 1), one bridge and one writer as processes.
Every 10 s it records the processes' memory, the writer's lag, how many readings wait in
the broker for the bridge, and the latency from MQTT publish to readable in Kafka.
At the end: `<out>/soak.json` and a chart, `<out>/soak.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import (
    create_consumer,
    end_offsets,
    ensure_topics,
    settings_admin,
    topic_partitions,
)
from gateway.services.registry import RegistryWriter
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from simulators.bench.harness import (
    DEVICES,
    Publisher,
    forget_sessions,
    pregenerate,
    unlimited,
)
from simulators.fleet import build_fleet
from simulators.processes import ServiceProcess, usage

WINDOW_S = 10.0


class LatencyWatch:
    """Reads iot.readings from its start and keeps how long each reading took to get there
    since the publisher sent it (`sent_at`, which it empties as readings arrive)."""

    def __init__(self, settings: Settings, sent_at: dict[tuple[str, int], float]) -> None:
        self.settings, self.sent_at = settings, sent_at
        self.seen = 0
        self.expected = 0
        self.caught_up = asyncio.Event()
        self.window: list[float] = []
        self._consumer = create_consumer(settings, fetch_max_wait_ms=5)

    async def run(self) -> None:
        topic = Topics(self.settings.topic_prefix).readings
        await self._consumer.start()
        try:
            ids = await topic_partitions(self.settings, topic)
            self._consumer.assign([TopicPartition(topic, p) for p in ids])
            while True:
                batches = await self._consumer.getmany(timeout_ms=50)
                now = time.perf_counter()
                for records in batches.values():
                    for record in records:
                        self.seen += 1
                        value = json.loads(record.value)
                        sent = self.sent_at.pop((value["device_id"], value["seq"]), None)
                        if sent is not None:
                            self.window.append((now - sent) * 1000)
                if self.expected and self.seen >= self.expected:
                    self.caught_up.set()
        finally:
            await self._consumer.stop()


async def writer_lag(settings: Settings) -> int:
    """Records of iot.readings the writer's group has not committed yet."""
    topic = Topics(settings.topic_prefix).readings
    async with settings_admin(settings) as admin:
        committed = await admin.list_consumer_group_offsets(settings.writer_group)
    end = await end_offsets(settings, topic)
    return sum(
        offset - (committed[tp].offset if tp in committed else 0) for tp, offset in end.items()
    )


def service(name: str, settings: Settings, log: Path) -> ServiceProcess:
    # A short session, removed at the end: a session left behind would go on queueing
    # every reading for a bridge that never comes back.
    return ServiceProcess(name, unlimited(settings, settings.mqtt_client_id, 60), log).start()


async def soak(base: Settings, rate: float, minutes: float, out: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={
            "topic_prefix": f"soak{tag}", "mqtt_client_id": f"soak-bridge-{tag}",
            "writer_group": f"soak-writer-{tag}", "influx_db": f"soak_{tag}",
            **({"influx_bucket": f"soak_{tag}"} if base.influx_v2 else {}),
        }
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    await ensure_topics(settings)
    async with InfluxClient.for_settings(settings) as influx:
        await influx.create_database(settings.influx_database)
    async with RegistryWriter(settings) as registry:
        await registry.put(*(d.record() for d in build_fleet(DEVICES, 7)))
    bridge = service("bridge", settings, out / "soak-bridge.log")
    writer: ServiceProcess | None = None
    samples: list[dict[str, Any]] = []
    sent = 0
    try:
        await bridge.ready()
        # Started once the bridge listens: two started at once can pick the same free port.
        writer = service("writer", settings, out / "soak-writer.log")
        await writer.ready()
        async with Publisher(settings) as publisher:
            watch = LatencyWatch(settings, publisher.sent_at)
            watching = asyncio.create_task(watch.run())
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < minutes * 60:
                chunk = pregenerate(int(rate * WINDOW_S))
                await publisher.run(chunk, rate)
                sent += len(chunk)
                window, watch.window = watch.window, []
                samples.append(
                    {
                        "t_s": round(elapsed + WINDOW_S),
                        "sent": sent,
                        "in_kafka": watch.seen,
                        "bridge_rss_mb": usage(bridge.pid)[1],
                        "writer_rss_mb": usage(writer.pid)[1],
                        "writer_lag": await writer_lag(settings),
                        "p50_ms": round(statistics.median(window), 1) if window else None,
                        "p99_ms": round(statistics.quantiles(window, n=100)[98], 1)
                        if len(window) > 1 else None,
                    }
                )  # fmt: skip
                print(json.dumps(samples[-1]), flush=True)
            watch.expected = sent
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.caught_up.wait(), 120)
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
    finally:
        for process in (bridge, writer):
            if process is not None:
                process.stop(20)
        await forget_sessions(settings, [settings.mqtt_client_id])
    result = {"rate": rate, "minutes": minutes, "sent": sent, "in_kafka": watch.seen,
              "not_in_kafka": max(0, sent - watch.seen), "samples": samples}  # fmt: skip
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    chart(result, out / "soak.png")
    return result


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t_s"] for s in samples]
    figure, (memory, lag, latency) = plt.subplots(1, 3, figsize=(14, 4))
    memory.plot(t, [s["bridge_rss_mb"] for s in samples], label="bridge")
    memory.plot(t, [s["writer_rss_mb"] for s in samples], label="writer")
    memory.set_title("peak RSS (MB)")
    memory.legend()
    lag.plot(t, [s["writer_lag"] for s in samples], label="writer lag")
    lag.plot(t, [s["sent"] - s["in_kafka"] for s in samples], label="sent, not in Kafka yet")
    lag.set_title("readings behind")
    lag.legend()
    latency.plot(t, [s["p50_ms"] for s in samples], label="p50")
    latency.plot(t, [s["p99_ms"] for s in samples], label="p99")
    latency.set_title("publish to Kafka (ms)")
    latency.legend()
    for axis in (memory, lag, latency):
        axis.set_xlabel("seconds")
    achieved = result["sent"] / max(samples[-1]["t_s"], 1)
    figure.suptitle(
        f"iotgw soak: {result['rate']:.0f} readings/s offered, {achieved:.0f}/s sent, "
        f"for {result['minutes']} min"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=5000)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    result = asyncio.run(soak(load_settings(), args.rate, args.minutes, args.out))
    print(f"soak: sent {result['sent']}, records in Kafka {result['in_kafka']}, "
          f"not in Kafka {result['not_in_kafka']}; "
          f"chart {args.out / 'soak.png'}")  # fmt: skip


if __name__ == "__main__":
    main()
