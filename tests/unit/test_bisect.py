"""The writer's search for refused points, by halves, with a receiver that refuses some."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway.domain.bisect import Refused, write_bisecting

pytestmark = pytest.mark.unit


class Receiver:
    """Refuses any batch holding a bad item, as InfluxDB refuses a whole write (400)."""

    def __init__(self, bad: set[int]) -> None:
        self.bad = bad
        self.calls = 0
        self.stored: list[int] = []
        self.refused: list[tuple[int, str]] = []

    async def write(self, items: Sequence[int]) -> None:
        self.calls += 1
        if self.bad & set(items):
            raise Refused(f"field type conflict in {sorted(self.bad & set(items))}")
        self.stored += items

    async def refuse(self, item: int, reason: str) -> None:
        self.refused.append((item, reason))


async def test_every_good_item_is_written_and_each_bad_one_refused_alone() -> None:
    """1,000 items, 3 bad: the bad ones go to `refused` one by one with the reason, every
    good one is written, and the search costs tens of writes, not a thousand."""
    receiver = Receiver({7, 500, 999})
    await write_bisecting(list(range(1000)), receiver.write, receiver.refuse)
    assert sorted(set(receiver.stored)) == sorted(set(range(1000)) - {7, 500, 999})
    assert [item for item, _ in receiver.refused] == [7, 500, 999]
    assert receiver.refused[0][1] == "field type conflict in [7]"
    assert receiver.calls < 70


async def test_a_batch_that_is_taken_is_one_write() -> None:
    """No bad item: one write, nothing refused."""
    receiver = Receiver(set())
    await write_bisecting([1, 2, 3], receiver.write, receiver.refuse)
    assert (receiver.calls, receiver.stored, receiver.refused) == (1, [1, 2, 3], [])


async def test_nothing_to_write_is_no_write() -> None:
    """An empty batch makes no request."""
    receiver = Receiver(set())
    await write_bisecting([], receiver.write, receiver.refuse)
    assert receiver.calls == 0
