"""The stack's installer: clear one-line errors when a prerequisite is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack.installer import (
    ensure_debian_packages,
    ensure_influxd2,
    ensure_java,
    influxd2_home,
    influxd2_toolchain,
    kafka_version,
)
from devstack.stack import LOCAL_TEMPLATES, StackPlan, StackState, new_cluster_id
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


def _fake_tools(folder: Path, scripts: dict[str, str], *, without: str = "") -> None:
    """Executables in `folder`, each running its shell line; none named `without`."""
    for name, script in scripts.items():
        if name == without:
            continue
        tool = folder / name
        tool.write_text(f"#!/bin/sh\n{script}\n")
        tool.chmod(0o755)


# A build machine with every tool at a version that will do, and no rustup.
GOOD_TOOLS = {
    "go": "echo 'go version go1.23.4 linux/amd64'",
    "gcc": "exit 0",
    "rustc": "echo 'rustc 1.80.1 (3f5fd8dd4 2024-08-06)'",
    "cargo": "echo 'cargo 1.80.1 (376290515 2024-07-16)'",
}


@pytest.fixture
def tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """PATH is an empty folder of fake tools, the cache a temporary folder."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return folder


def test_influxd2_build_without_go_says_where_to_get_it(tools: Path) -> None:
    """No go on PATH: the error names Go 1.23 and go.dev before anything is built."""
    _fake_tools(tools, GOOD_TOOLS, without="go")
    with pytest.raises(IotgwError, match=r"^Go 1\.23 or newer .* https://go.dev/dl/$"):
        influxd2_toolchain()


def test_influxd2_build_refuses_an_old_go(tools: Path) -> None:
    """A Go older than the module's go.mod asks for is named with its version."""
    _fake_tools(tools, GOOD_TOOLS | {"go": "echo 'go version go1.21.13 linux/amd64'"})
    with pytest.raises(IotgwError, match=r"needs Go 1\.23 or newer, found Go 1\.21"):
        influxd2_toolchain()


def test_influxd2_build_without_gcc_names_it(tools: Path) -> None:
    """No gcc (cgo needs one): the error says which package to install."""
    _fake_tools(tools, GOOD_TOOLS, without="gcc")
    with pytest.raises(IotgwError, match=r"^gcc is needed .*apt-get install gcc"):
        influxd2_toolchain()


@pytest.mark.parametrize("missing", ["rustc", "cargo"])
def test_influxd2_build_without_rust_points_to_rustup(tools: Path, missing: str) -> None:
    """rustc or cargo missing: the error names the tool, Rust 1.72 and rustup."""
    _fake_tools(tools, GOOD_TOOLS, without=missing)
    with pytest.raises(
        IotgwError, match=rf"Rust 1\.72 or newer .*{missing} is not on PATH.*rustup"
    ):
        influxd2_toolchain()


def test_influxd2_build_refuses_an_old_rust(tools: Path) -> None:
    """A rustc older than Flux's 1.72 is named with its version."""
    _fake_tools(tools, GOOD_TOOLS | {"rustc": "echo 'rustc 1.70.0 (90c541806 2023-05-31)'"})
    with pytest.raises(IotgwError, match=r"needs Rust 1\.72 or newer, found rustc 1\.70"):
        influxd2_toolchain()


def test_influxd2_build_takes_rustups_stable_toolchain(tools: Path) -> None:
    """With rustup, Rust is checked and used as RUSTUP_TOOLCHAIN=stable (not Flux's pin)."""
    # Rustup's default here is an old toolchain; its stable one will do.
    stable = 'test "$RUSTUP_TOOLCHAIN" = stable && echo "{0} 1.80.0" || echo "{0} 1.60.0"'
    rust = {tool: stable.format(tool) for tool in ("rustc", "cargo")}
    _fake_tools(tools, GOOD_TOOLS | rust | {"rustup": "exit 0"})
    assert influxd2_toolchain() == {"RUSTUP_TOOLCHAIN": "stable"}


def test_influxd2_build_without_rustup_leaves_the_toolchain_alone(tools: Path) -> None:
    """Rust installed without rustup (a distribution's) gets no RUSTUP_TOOLCHAIN."""
    _fake_tools(tools, GOOD_TOOLS)
    assert influxd2_toolchain() == {}


def test_influxd2_failed_step_names_the_log_and_is_not_taken_for_done(
    tools: Path, tmp_path: Path
) -> None:
    """A failed step is one line naming it and the log; unmarked, the next call builds again."""
    go = (
        'case "$1" in version) echo "go version go1.23.4";; *) echo "no network" >&2; exit 1;; esac'
    )
    _fake_tools(tools, GOOD_TOOLS | {"go": go})
    log = tmp_path / "install.log"
    said: list[str] = []
    with pytest.raises(IotgwError, match=rf"failed while downloading the module; see {log}$"):
        ensure_influxd2(log, said.append)
    assert "no network" in log.read_text()
    assert "about 6 minutes" in said[0]
    assert not (influxd2_home() / ".complete").exists()
    with pytest.raises(IotgwError, match="failed while downloading"):
        ensure_influxd2(log, said.append)


def test_influxd2_once_built_needs_no_tools(tools: Path) -> None:
    """A complete build in the cache is used as it is, with no Go or Rust on PATH."""
    (influxd2_home() / "bin").mkdir(parents=True)
    (influxd2_home() / ".complete").write_text("2.7.12\n")
    assert ensure_influxd2(tools / "log", print) == influxd2_home() / "bin" / "influxd"


def test_stack_of_an_older_iotgw_runs_influxdb_1(tmp_path: Path) -> None:
    """A stack.json written before InfluxDB 2 could run loads as an InfluxDB 1 stack."""
    old = {"mqtt_port": 1883, "kafka_port": 9092, "kafka_brokers": 1, "influx_port": 8086,
           "kinds": ["influxdb"], "kafka_cluster_id": "x"}  # fmt: skip
    (tmp_path / "stack.json").write_text(json.dumps(old))
    state = StackState.load(tmp_path)
    assert state is not None
    assert state.plan(tmp_path).influx_version == 1


def test_only_influxdb_1_or_2_can_be_asked_for() -> None:
    """--influxdb 3 is an input error (exit 2) naming the choices."""
    with pytest.raises(IotgwError, match="--influxdb must be 1 or 2") as error:
        StackPlan(influx_version=3)
    assert error.value.exit_code == 2
