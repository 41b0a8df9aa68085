"""The stack's installer: clear one-line errors when a prerequisite is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack.installer import ensure_debian_packages, ensure_java, kafka_version
from devstack.stack import LOCAL_TEMPLATES, new_cluster_id
from gateway.errors import IotgwError

pytestmark = pytest.mark.unit


def test_missing_java_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no java on PATH the error names Java 17 and a package that provides it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(IotgwError, match=r"Java 17 .*openjdk-17-jre-headless"):
        ensure_java()


def test_old_java_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A Java older than 17 is named with its version."""
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'openjdk version \"11.0.2\" 2019-01-15' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(IotgwError, match="found Java 11"):
        ensure_java()


def test_not_root_names_packages_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without root, apt-get cannot run: the error says what to install by hand."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(IotgwError, match=r"sudo apt-get install influxdb mosquitto"):
        ensure_debian_packages(["mosquitto", "influxd"], tmp_path / "log", print)


def test_pom_names_a_kafka_4_release() -> None:
    """The local stack's Kafka is a 4.x release, read from compose/local/pom.xml."""
    assert kafka_version(LOCAL_TEMPLATES / "pom.xml").startswith("4.")


def test_a_new_kafka_cluster_id_never_looks_like_an_option() -> None:
    """kafka-storage format -t takes an id that starts with '-' for an option and fails;
    such ids (one in 64) are drawn again."""
    ids = [new_cluster_id() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
