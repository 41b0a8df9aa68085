"""The writer's batches written at once and committed in the order they were read."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from gateway.services.writer import InOrderCommits

pytestmark = pytest.mark.unit

P0, P1 = TopicPartition("iot.readings", 0), TopicPartition("iot.readings", 1)


class WriteError(Exception):
    """A write that failed in a test."""


async def write_when(event: asyncio.Event) -> None:
    """A write that InfluxDB answers once `event` is set."""
    await event.wait()


async def test_a_batch_written_first_is_committed_only_with_the_older_ones() -> None:
    """The newer batch is written before the older one: nothing is committed until the
    older one is written too, then both at once, with each partition's highest offset."""
    older, newer = asyncio.Event(), asyncio.Event()
    older_write = asyncio.create_task(write_when(older))
    newer_write = asyncio.create_task(write_when(newer))
    commits = InOrderCommits()
    commits.add(older_write, {P0: 10, P1: 5})
    commits.add(newer_write, {P0: 20})
    newer.set()
    await newer_write
    assert commits.written() == {}
    assert len(commits) == 2
    older.set()
    await commits.wait_oldest(5)
    assert commits.written() == {P0: 20, P1: 5}
    assert len(commits) == 0


async def test_a_failed_write_commits_nothing_after_it() -> None:
    """The oldest write failed: `written` raises its error and commits none of the batches
    read after it, even those already written."""

    async def fail() -> None:
        raise WriteError

    async def succeed() -> None:
        return None

    writes = [asyncio.create_task(fail()), asyncio.create_task(succeed())]
    commits = InOrderCommits()
    commits.add(writes[0], {P0: 10})
    commits.add(writes[1], {P0: 20})
    await asyncio.gather(*writes, return_exceptions=True)
    with pytest.raises(WriteError):
        commits.written()


async def test_waiting_for_the_oldest_write_ends_at_the_timeout() -> None:
    """A write that takes long does not hold the caller past its timeout; cancel stops it."""
    commits = InOrderCommits()
    hanging = asyncio.create_task(write_when(asyncio.Event()))
    commits.add(hanging, {P0: 1})
    await commits.wait_oldest(0.01)
    assert commits.written() == {}
    commits.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hanging
    assert len(commits) == 0
