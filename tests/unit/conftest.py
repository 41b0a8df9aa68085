"""Fixtures of the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The test starts with no IOTGW_ variables and no iotgw.toml in its working folder."""
    for name in list(os.environ):
        if name.startswith("IOTGW_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
