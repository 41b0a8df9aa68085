"""What `pip install iotgw` brings: the services' dependencies, not the dev tooling."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEV_ONLY = {"matplotlib", "paho-mqtt", "kafka-python"}


def runtime_closure() -> set[str]:
    """Every package the lock installs for iotgw without extras or dev groups."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {package["name"]: package for package in lock["package"]}
    found: set[str] = set()
    pending = [d["name"] for d in packages["iotgw"]["dependencies"]]
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending += [d["name"] for d in packages[name].get("dependencies", [])]
    return found


def test_the_runtime_pulls_no_benchmark_or_baseline_library() -> None:
    """matplotlib, paho-mqtt and kafka-python are the benchmark's (the `bench` extra)."""
    closure = runtime_closure()
    assert {"aiokafka", "gmqtt", "pydantic"} <= closure
    assert not closure & DEV_ONLY


def test_the_wheel_and_the_image_leave_the_dev_stack_out() -> None:
    """devstack/ (apt-get, Maven, the local stack) is in neither the wheel nor the image."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "devstack" not in project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line]  # fmt: skip
    assert "gateway" in copied
    assert "devstack" not in copied
