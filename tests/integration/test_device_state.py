"""Each device's last-known state on Kafka: partial readings and availability merged by
`iotgw run state`, printed by `devices show` and `devices list --status`, and rebuilt
from scratch after the state topic is lost."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import NewPartitions

from gateway.adapters.kafka import (
    end_offsets,
    ensure_topics,
    produce,
    settings_admin,
    topic_partitions,
)
from gateway.clock import now_ms
from gateway.domain.records import AvailabilityRecord, CanonicalReading, DeviceState
from gateway.domain.state import DeviceStates
from gateway.errors import IotgwError
from gateway.services.state import StateService, read_states
from gateway.settings import Settings
from gateway.topics import Topics
from schemas import Device
from simulators.processes import ServiceProcess
from tests.conftest import unique
from tests.support import register, running, service_env

pytestmark = pytest.mark.integration


@pytest.fixture
async def state_settings(settings: Settings) -> Settings:
    """Settings with this test's own topics (created) and state group."""
    own = settings.model_copy(
        update={
            "topic_prefix": unique("st").replace("-", ""),
            "state_group": unique("state"),
            "metrics_port": 0,
        }
    )
    await ensure_topics(own)
    return own


def reading(device_id: str, device_type: str, ts: int, **metrics: Any) -> CanonicalReading:
    return {
        "device_id": device_id,
        "type": device_type,
        "ts": ts,
        "seq": None,
        "metrics": metrics,
        "received_at": ts,
    }


def availability(device_id: str, online: bool, ts: int) -> AvailabilityRecord:
    return {"device_id": device_id, "online": online, "ts": ts, "source": "envelope"}


async def publish(
    settings: Settings, readings: list[CanonicalReading], presence: list[AvailabilityRecord]
) -> None:
    """Produce readings and availability records as the bridge does: keyed by device."""
    topics = Topics(settings.topic_prefix)
    for topic, records in ((topics.readings, readings), (topics.availability, presence)):
        await produce(
            settings,
            topic,
            [(r["device_id"].encode(), json.dumps(r).encode()) for r in records],
        )


def merge(
    readings: list[CanonicalReading], presence: list[AvailabilityRecord]
) -> dict[str, DeviceState]:
    """What the pure merge makes of the records."""
    states = DeviceStates()
    for r in readings:
        states.reading(r)
    for a in presence:
        states.availability(a)
    return states.take_changed()


async def until_states(
    settings: Settings, expected: dict[str, DeviceState], timeout_s: float = 30
) -> None:
    """Wait until the state topic, read to its end, holds exactly `expected`."""
    deadline = time.monotonic() + timeout_s
    while (found := await read_states(settings)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"state not reached in {timeout_s} s: {found} != {expected}")
        await asyncio.sleep(0.2)


async def iotgw(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`iotgw ARGS` as a user runs it, on a wide terminal (in a thread: services of the
    test keep running)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", *args],
        env={**service_env(settings), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def seconds(pattern: str, text: str) -> int:
    """The `N` of `N s ago` that `pattern` captures in `text`."""
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return int(found.group(1))


async def test_partial_readings_and_availability_become_the_merged_state(
    state_settings: Settings,
) -> None:
    """Partial readings (one late and older) and availability records give, per device,
    the state the merge gives: each metric's newest value, last seen, online."""
    s, t0 = state_settings, now_ms() - 60_000
    readings = [
        reading("thermo-1", "thermostat", t0, temperature_c=21.0, humidity_pct=40.0),
        reading("thermo-1", "thermostat", t0 + 2000, temperature_c=21.5),
        reading("thermo-1", "thermostat", t0 + 3000, heating=True),
        reading("thermo-1", "thermostat", t0 + 1000, temperature_c=19.0, setpoint_c=20.0),
        reading("plug-1", "smart_plug", t0, on=True, power_w=12.5),
    ]
    presence = [
        availability("thermo-1", True, t0),
        availability("plug-1", True, t0),
        availability("plug-1", False, t0 + 5000),
    ]
    await publish(s, readings, presence)
    async with running(StateService(s)):
        await until_states(s, merge(readings, presence))
    thermo = (await read_states(s))["thermo-1"]
    assert {name: m["value"] for name, m in thermo["metrics"].items()} == {
        "temperature_c": 21.5, "humidity_pct": 40.0, "heating": True, "setpoint_c": 20.0,
    }  # fmt: skip
    assert (thermo["last_seen"], thermo["online"]) == (t0 + 3000, True)


async def test_show_and_list_status_print_the_state(state_settings: Settings) -> None:
    """`devices show` prints each metric with its age, online since when and last seen
    (and the state in --json); `list --status` adds online and last seen, and counts
    per site."""
    s, now = state_settings, now_ms()
    await register(
        s,
        Device(device_id="thermo-1", type="thermostat", site="home", registered_at=now),
        Device(device_id="plug-1", type="smart_plug", site="home", registered_at=now),
        Device(device_id="door-1", type="contact", site="lab", registered_at=now),
    )
    readings = [
        reading("thermo-1", "thermostat", now - 12_000, temperature_c=21.5),
        reading("thermo-1", "thermostat", now - 180_000, humidity_pct=40.0),
        reading("plug-1", "smart_plug", now - 5000, on=True),
    ]
    presence = [availability("thermo-1", True, now - 600_000), availability("plug-1", False, now)]
    await publish(s, readings, presence)
    async with running(StateService(s)):
        await until_states(s, merge(readings, presence))

    shown = await iotgw(s, "devices", "show", "thermo-1")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"status +online since \S+Z \(10 min ago\)", shown.stdout)
    assert 12 <= seconds(r"last seen +\S+Z \((\d+) s ago\)", shown.stdout) < 60
    assert 12 <= seconds(r"21\.5 +temperature_c +(\d+) s ago", shown.stdout) < 60
    assert re.search(r"40\.0 +humidity_pct +3 min ago", shown.stdout)

    as_json = json.loads((await iotgw(s, "devices", "show", "thermo-1", "--json")).stdout)
    assert as_json["site"] == "home"
    assert as_json["state"]["metrics"]["temperature_c"] == {"value": 21.5, "ts": now - 12_000}
    assert as_json["state"]["online"] is True

    listed = await iotgw(s, "devices", "list", "--status")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1]: line for line in listed.stdout.splitlines() if "-1 " in line}
    assert 12 <= seconds(r"│ online +│ (\d+) s ago", rows["thermo-1"]) < 60
    assert 5 <= seconds(r"│ offline +│ (\d+) s ago", rows["plug-1"]) < 60
    assert re.search(r"│ unknown +│ never", rows["door-1"])
    counts = [
        [cell for cell in line.split() if cell != "│"]
        for line in listed.stdout.splitlines()
        if re.fullmatch(r"│ (home|lab) +(│ +\d+ +){3}│", line)
    ]
    assert counts == [["home", "1", "1", "0"], ["lab", "0", "0", "1"]]


async def test_rebuild_after_losing_the_state_topic_gives_the_same_state(
    state_settings: Settings,
) -> None:
    """Delete and recreate iot.devices.state, run `devices state-rebuild`: the state is
    the one the service had made; a rebuild while the service runs is refused."""
    s, t0 = state_settings, now_ms() - 60_000
    readings = [
        reading(f"climate-{i}", "climate", t0 + n * 1000, **{metric: float(i + n)})
        for i in range(5)
        for n, metric in enumerate(["temperature_c", "humidity_pct", "temperature_c"])
    ]
    presence = [availability(f"climate-{i}", i % 2 == 0, t0 + i) for i in range(5)]
    await publish(s, readings, presence)
    async with running(StateService(s)):
        await until_states(s, merge(readings, presence))
        live = await read_states(s)
        refused = await iotgw(s, "devices", "state-rebuild")
    assert refused.returncode == 1
    assert refused.stderr.startswith("iotgw: error: `iotgw run state` is running")
    assert len(refused.stderr.splitlines()) == 1

    await recreate(s, Topics(s.topic_prefix).devices_state)
    assert await read_states(s) == {}
    rebuilt = await iotgw(s, "devices", "state-rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.strip() == (
        "rebuilt the state of 5 device(s) from 15 reading(s) and 5 availability record(s)"
    )
    assert await read_states(s) == live


async def test_instances_joining_and_leaving_the_group_keep_the_merge(
    state_settings: Settings,
) -> None:
    """A second instance joins the group and leaves it again while records keep coming:
    each rebalance hands devices over with their state, none is merged over a stale one."""
    s, t0 = state_settings, now_ms() - 60_000
    readings: list[CanonicalReading] = []
    presence: list[AvailabilityRecord] = []

    async def more(step: int, partial: bool = False) -> None:
        """Each device's lux, and unless `partial` its motion and whether it is online."""
        ts = t0 + step * 1000
        batch = [reading(f"motion-{i}", "motion", ts + i, lux=float(step)) for i in range(50)]
        online: list[AvailabilityRecord] = []
        if not partial:
            batch += [reading(f"motion-{i}", "motion", ts + i, motion=step == 1) for i in range(50)]
            online = [availability(f"motion-{i}", step == 1, ts + i) for i in range(50)]
        readings.extend(batch)
        presence.extend(online)
        await publish(s, batch, online)

    first = StateService(s)
    async with running(first):
        await more(0)
        await until_states(s, merge(readings, presence))
        async with running(StateService(s)) as second:
            await more(1)
            await until_states(s, merge(readings, presence))
            assert second.merger.counts["readings"] > 0, "the second instance got no partition"
        # Merged over a state older than the second instance's, motion and online would
        # go back to step 0's.
        await more(2, partial=True)
        await until_states(s, merge(readings, presence))


async def recreate(settings: Settings, topic: str) -> None:
    """Delete `topic`, wait until Kafka has forgotten it, and create it again."""
    async with settings_admin(settings) as admin:
        await admin.delete_topics([topic])
        deadline = time.monotonic() + 30
        while topic in await admin.list_topics():
            assert time.monotonic() < deadline, f"{topic} still there after 30 s"
            await asyncio.sleep(0.2)
    await ensure_topics(settings)


async def test_show_list_and_rebuild_fail_in_one_line(state_settings: Settings) -> None:
    """An unknown device and an unreachable Kafka: exit 1, one line each."""
    unknown = await iotgw(state_settings, "devices", "show", "nosuch")
    assert (unknown.returncode, unknown.stderr) == (
        1, "iotgw: error: device nosuch is not registered\n",
    )  # fmt: skip
    away = state_settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1", "timeout_s": 2})
    for args in (("show", "nosuch"), ("list", "--status"), ("state-rebuild",)):
        failed = await iotgw(away, "devices", *args)
        assert failed.returncode == 1, args
        assert failed.stderr.startswith("iotgw: error: "), args
        assert "127.0.0.1:1" in failed.stderr, args
        assert len(failed.stderr.splitlines()) == 1, failed.stderr


async def test_kill_9_while_merging_loses_and_corrupts_nothing(
    state_settings: Settings, tmp_path: Path
) -> None:
    """kill -9 `iotgw run state` while it merges a backlog, add more, restart it: the
    state is the merge of every record, though the kill left records uncommitted."""
    s, t0 = state_settings, now_ms() - 3_600_000
    chance = random.Random(18)
    # 200 plugs, a reading each every 2 s; every tenth of a plug's readings is late
    # (older than the two before it).
    readings = [
        reading(
            f"plug-{n % 200}",
            "smart_plug",
            t0 + n * 10 - (5000 if (n // 200) % 10 == 9 else 0),
            **{chance.choice(["power_w", "voltage_v", "current_a"]): float(n % 300)},
        )
        for n in range(60_000)
    ]
    presence = [availability(f"plug-{i}", i % 3 != 0, t0 + i) for i in range(200)]
    first, rest = readings[:40_000], readings[40_000:]
    await publish(s, first, presence)
    log = tmp_path / "state.log"
    service = ServiceProcess("state", s, log).start()
    try:
        await service.ready()
        await until_written(s)
        service.kill()
        total = len(first) + len(presence)
        assert await committed(s) < total, "the kill came after everything was committed"
        await publish(s, rest, [])
        service = ServiceProcess("state", s, log).start()
        await service.ready()
        await until_states(s, merge(readings, presence), timeout_s=60)
    finally:
        service.stop()


async def until_written(settings: Settings, timeout_s: float = 30) -> None:
    """Wait until the service wrote its first states."""
    deadline = time.monotonic() + timeout_s
    while not sum(
        (await end_offsets(settings, Topics(settings.topic_prefix).devices_state)).values()
    ):
        assert time.monotonic() < deadline, f"no state written in {timeout_s} s"
        await asyncio.sleep(0.01)


async def committed(settings: Settings) -> int:
    """Records the state group has committed, over all partitions."""
    async with settings_admin(settings) as admin:
        offsets = await admin.list_consumer_group_offsets(settings.state_group)
    return sum(max(0, meta.offset) for meta in offsets.values())


async def test_unequal_partition_counts_stop_the_service_in_one_line(
    state_settings: Settings,
) -> None:
    """iot.availability with more partitions than iot.readings: the service does not start
    (two instances could merge one device's readings and availability apart)."""
    s = state_settings
    topics = Topics(s.topic_prefix)
    async with settings_admin(s) as admin:
        await admin.create_partitions({topics.availability: NewPartitions(total_count=8)})
    deadline = time.monotonic() + 30
    while len(await topic_partitions(s, topics.availability)) < 8:
        assert time.monotonic() < deadline, "iot.availability not grown to 8 partitions in 30 s"
        await asyncio.sleep(0.1)
    with pytest.raises(IotgwError) as stopped:
        await asyncio.wait_for(StateService(s).run(asyncio.Event()), 30)
    assert str(stopped.value) == (
        f"{topics.readings} has 6 partitions and {topics.availability} 8: give them the same "
        "count, so a device's readings and availability reach the same state service"
    )
