"""The live bridge under hostile input: 10,000 generated and nasty payloads through
Mosquitto. It stays up, accounts for every payload, and valid readings keep flowing."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from gateway.clock import now_ms
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.validation import ReadingValidator
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from tests.conftest import unique
from tests.faults.test_bridge_faults import stream
from tests.hostile import REASONS, draw_payloads, nasty_corpus
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    register,
    running_bridge,
    until,
)

pytestmark = pytest.mark.faults

PAYLOADS = 10_000


async def test_hostile_payloads_are_all_accounted_for_and_valid_readings_flow(
    settings: Settings,
) -> None:
    """10,000 payloads (a corpus of nasty cases, the rest drawn from hypothesis strategies)
    from 20 devices and a few odd topic ids, while one good device streams 500 readings:
    valid readings + dead letters = what the messages hold, every dead letter has a reason
    of DESIGN.md, every good reading arrives, and the bridge is still ready at the end."""
    s = await own_settings(settings)
    hostile = [
        Device(device_id=unique("hostile"), type=DeviceType.THERMOSTAT, registered_at=0)
        for _ in range(20)
    ]
    good = Device(device_id=unique("good"), type=DeviceType.THERMOSTAT, registered_at=0)
    await register(s, *hostile, good)

    corpus = [payload for _, payload in nasty_corpus(hostile[0].device_id)]
    drawn = draw_payloads(hostile[0].device_id, PAYLOADS - len(corpus))
    topics = [f"devices/{d.device_id}/telemetry" for d in hostile]
    topics += ["devices/ghost-device/telemetry", "devices/\u0442\u0435\u0441\u0442/telemetry"]
    messages = [(topics[i % len(topics)], p) for i, p in enumerate(corpus + drawn)]
    # How many readings and dead letters the messages hold (a batch holds several); the
    # count does not depend on the registry, the clock or the rate limit.
    counter = ReadingValidator(
        lambda _: None, require_registration=False, max_age_ms=1, limiter=RateLimiter(1, 1)
    )
    held = sum(len(counter.process(topic, payload, now_ms())) for topic, payload in messages)

    names = Topics(s.topic_prefix)
    try:
        async with (
            running_bridge(s) as bridge,
            TopicReader(s, names.readings) as readings,
            TopicReader(s, names.dead_letters) as dead_letters,
        ):
            started = time.monotonic()
            flowing = asyncio.create_task(stream(s, [good], 500, rate=50))
            async with DevicePublisher(s.mqtt.host, s.mqtt.port) as publisher:
                for topic, payload in messages:
                    await publisher.publish(topic, payload)
            await flowing
            total = held + 500
            await until(
                lambda: len(readings.records) + len(dead_letters.records) >= total,
                120,
                f"{total} readings and dead letters",
            )
            took = time.monotonic() - started
            assert all(bridge.readiness().values()), bridge.readiness()
        good_seqs = sorted(v["seq"] for v in readings.values() if v["device_id"] == good.device_id)
        assert good_seqs == list(range(500))
        assert len(readings.records) + len(dead_letters.records) == total
        reasons = Counter(dict(r.headers)["error"].decode() for r in dead_letters.records)
        assert set(reasons) <= REASONS
        print(
            f"hostile input: {len(messages)} messages holding {held} readings in {took:.1f} s; "
            f"valid {len(readings.records) - 500}, dead letters {dict(sorted(reasons.items()))}"
        )
    finally:
        await forget_session(s)
