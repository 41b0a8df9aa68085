"""Finding the items a batch write refuses, by halves (pure logic, any I/O given to it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

__all__ = ["Refused", "write_bisecting"]

Item = TypeVar("Item")


class Refused(Exception):  # noqa: N818 - an outcome, carried to the caller
    """The receiver refused the batch (one of its items, at least); the message says why."""


async def write_bisecting(
    items: Sequence[Item],
    write: Callable[[Sequence[Item]], Awaitable[None]],
    refused: Callable[[Item, str], Awaitable[None]],
) -> None:
    """Write `items` in one call; if the batch is refused, write each half the same way,
    down to single items, which go to `refused` with the reason. The items of a half that
    was refused with others are written again: the receiver must take a repeat (InfluxDB
    overwrites a point with the same series and time)."""
    if not items:
        return
    try:
        await write(items)
    except Refused as exc:
        if len(items) == 1:
            await refused(items[0], str(exc))
            return
        middle = len(items) // 2
        await write_bisecting(items[:middle], write, refused)
        await write_bisecting(items[middle:], write, refused)
