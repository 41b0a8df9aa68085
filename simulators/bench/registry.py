"""Benchmark: how long and how much memory a registry of N devices takes to load at start.

    python -m simulators.bench.registry --devices 100000

Writes N devices to a registry topic of its own, loads it in a fresh process (so its
peak RSS is the loader's alone), prints the figures and deletes its topics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

from gateway.adapters.kafka import ensure_topics, kafka_admin
from gateway.services.registry import DeviceRegistry, RegistryWriter
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from simulators.processes import usage

TYPES = list(DeviceType)


def fleet(count: int) -> list[Device]:
    """`count` devices spread over sites and rooms, like a large building portfolio."""
    return [
        Device(
            device_id=f"bench-{i:07d}",
            type=TYPES[i % len(TYPES)],
            name=f"Device {i}",
            site=f"site-{i % 200:03d}",
            room=f"room-{i % 37:02d}",
            registered_at=1_795_680_000_000 + i,
        )
        for i in range(count)
    ]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited at fork)."""
    return usage(os.getpid())[1]


async def load(settings: Settings) -> dict[str, float]:
    """Load the registry once and report time, device count and peak RSS."""
    baseline = peak_rss_mb()
    started = time.perf_counter()
    async with DeviceRegistry(settings) as registry:
        seconds = time.perf_counter() - started
        count = len(registry)
    return {
        "devices": count,
        "load_s": round(seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_load_mb": round(baseline, 1),
    }


async def fill(settings: Settings, count: int) -> None:
    await ensure_topics(settings)
    async with RegistryWriter(settings.model_copy(update={"timeout_s": 120.0})) as writer:
        devices = fleet(count)
        for start in range(0, count, 10_000):
            await writer.put(*devices[start : start + 10_000])
            print(f"wrote {min(start + 10_000, count)}/{count} devices", file=sys.stderr)


async def drop(settings: Settings) -> None:
    async with kafka_admin(settings.kafka_bootstrap, settings.timeout_s) as admin:
        await admin.delete_topics([spec.name for spec in Topics(settings.topic_prefix).specs()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--load-only", metavar="PREFIX", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = load_settings()
    if args.load_only:
        own = settings.model_copy(update={"topic_prefix": args.load_only})
        print(json.dumps(asyncio.run(load(own))))
        return
    own = settings.model_copy(update={"topic_prefix": f"bench{uuid.uuid4().hex[:8]}"})
    asyncio.run(fill(own, args.devices))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "simulators.bench.registry", "--load-only", own.topic_prefix],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        asyncio.run(drop(own))
    print(result.stdout.strip())


if __name__ == "__main__":
    main()
