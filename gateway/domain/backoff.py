"""How long to wait before trying again: capped exponential delays."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delays of `first` seconds, then `factor` times more after each failure, at most `cap`."""

    first: float
    cap: float
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap or self.factor < 1:
            raise ValueError("a backoff needs 0 < first <= cap and factor >= 1")

    def delay(self, failures: int) -> float:
        """The wait after `failures` failures in a row (0: after the first one)."""
        return min(self.cap, self.first * self.factor ** min(failures, 64))
