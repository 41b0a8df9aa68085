"""Capped exponential backoff."""

from __future__ import annotations

import pytest

from gateway.domain.backoff import Backoff

pytestmark = pytest.mark.unit


def test_delays_double_up_to_the_cap() -> None:
    """0.1, 0.2, 0.4, ... then the cap, however many failures."""
    backoff = Backoff(first=0.1, cap=1.0)
    assert [backoff.delay(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert backoff.delay(10_000) == 1.0


def test_nonsense_is_refused() -> None:
    """A first delay above the cap, or a shrinking one, is a mistake."""
    with pytest.raises(ValueError, match="first <= cap"):
        Backoff(first=2.0, cap=1.0)
    with pytest.raises(ValueError, match="factor >= 1"):
        Backoff(first=0.1, cap=1.0, factor=0.5)
