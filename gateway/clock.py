"""The wall clock in epoch milliseconds: the unit of every `ts` and `received_at`."""

from __future__ import annotations

import time

__all__ = ["now_ms"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000
