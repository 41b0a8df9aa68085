"""Installs what the local stack runs: Debian packages, Java 17, Kafka's jars via Maven, and
InfluxDB 2.7 built from source."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import IotgwError

Report = Callable[[str], None]

# Debian package that provides each binary the stack (and the benchmark) runs.
DEBIAN_PACKAGES = {
    "mosquitto": "mosquitto",
    "influxd": "influxdb",
    "mosquitto_sub": "mosquitto-clients",
    # The Compose implementation the tests validate compose/docker-compose.yml with.
    "docker-compose": "docker-compose",
}
MIN_JAVA = 17
# InfluxDB 2.x, built with Go from the module proxy: no Debian package and no release
# binary is used. Its go.mod asks for Go 1.23; Flux's Rust engine (libflux) for Rust 1.72.
INFLUXD2_VERSION = "2.7.12"
INFLUXD2_MODULE = "github.com/influxdata/influxdb/v2"
MIN_GO = (1, 23)
MIN_RUST = (1, 72)
# Wraps every rustc call: libflux and its crates were written for Rust 1.72, and lints of
# newer compilers would stop their build; capped at warn, they do not.
_RUSTC_CAPLINTS = """#!/bin/sh
case " $* " in *" --cap-lints "*) exec "$@";; esac
exec "$@" --cap-lints warn
"""
_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


@dataclass(frozen=True)
class KafkaDistribution:
    """Kafka's jars, resolved once by Maven into a cache folder keyed by the pom."""

    version: str
    libs: Path

    @property
    def classpath(self) -> str:
        return str(self.libs / "*")


def cache_dir() -> Path:
    """Where downloads are kept across stacks and checkouts (XDG cache, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iotgw"


def ensure_debian_packages(binaries: list[str], log: Path, report: Report) -> None:
    """Install the packages of the missing binaries with apt-get; a no-op when all exist."""
    missing = sorted({DEBIAN_PACKAGES[b] for b in binaries if shutil.which(b) is None})
    if not missing:
        return
    packages = " ".join(missing)
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise IotgwError(
            f"{packages} not installed and apt-get cannot install it here (needs root on "
            f"Debian): install it by hand, e.g. `sudo apt-get install {packages}`"
        )
    report(f"installing {packages} with apt-get (log: {log})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("ab") as out:
        for command in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        ):
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode:
                raise IotgwError(f"`{' '.join(command)}` failed; see {log}")


def java_version(java: str = "java") -> int:
    """The major version of the Java on PATH; IotgwError when there is none."""
    if shutil.which(java) is None:
        raise IotgwError(
            f"Java {MIN_JAVA} or newer is needed to run Kafka and none is on PATH: "
            "install it, e.g. `apt-get install openjdk-17-jre-headless`"
        )
    result = subprocess.run([java, "-version"], capture_output=True, text=True)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if not match:
        raise IotgwError(f"cannot tell the version of {java}: {result.stderr.strip()[:200]}")
    major = int(match.group(1))
    # Java 8 and older report themselves as "1.8".
    return int(match.group(2) or 0) if major == 1 else major


def ensure_java() -> int:
    version = java_version()
    if version < MIN_JAVA:
        raise IotgwError(
            f"Kafka needs Java {MIN_JAVA} or newer, found Java {version}: "
            "install e.g. openjdk-17-jre-headless and put it first on PATH"
        )
    return version


def kafka_version(pom: Path) -> str:
    """The Kafka version the pom resolves (its `kafka.version` property)."""
    node = ET.parse(pom).find("m:properties/m:kafka.version", _POM_NS)
    if node is None or not node.text:
        raise IotgwError(f"{pom} has no <kafka.version> property")
    return node.text.strip()


def ensure_kafka(pom: Path, log: Path, report: Report) -> KafkaDistribution:
    """Resolve Kafka's runtime jars with `mvn` once; later calls find them in the cache."""
    version = kafka_version(pom)
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    libs = cache_dir() / f"kafka-{version}-{digest}"
    done = libs / ".complete"
    if done.exists():
        return KafkaDistribution(version, libs)
    if shutil.which("mvn") is None:
        raise IotgwError(
            "Maven (mvn) is needed once to fetch Kafka's jars and none is on PATH: "
            "install it, e.g. `apt-get install maven`"
        )
    report(f"fetching Apache Kafka {version} from Maven Central with mvn (log: {log})")
    staging = libs.with_name(libs.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    command = [
        "mvn", "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
    ]  # fmt: skip
    with log.open("ab") as out:
        if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
            raise IotgwError(f"mvn could not resolve Kafka {version}; see {log}")
    if not any(staging.glob("kafka_2.13-*.jar")):
        raise IotgwError(f"mvn finished but no Kafka jar is in {staging}; see {log}")
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    done.write_text(version + "\n")
    return KafkaDistribution(version, libs)


def influxd2_toolchain() -> dict[str, str]:
    """Check the tools that build InfluxDB 2 (Go, gcc, Rust's rustc and cargo) before a build
    starts; the variables the Rust build then needs.

    Flux pins Rust 1.72 in its rust-toolchain.toml, which rustup would try to install (with
    five cross targets): where rustup manages Rust, RUSTUP_TOOLCHAIN=stable takes the
    installed stable one instead, and the versions checked are that toolchain's.
    """
    env = {"RUSTUP_TOOLCHAIN": "stable"} if shutil.which("rustup") else {}
    go = _tool_version(["go", "version"], r"go(\d+)\.(\d+)")
    if go is None:
        raise IotgwError(
            f"Go {_shown(MIN_GO)} or newer is needed once to build InfluxDB "
            f"{INFLUXD2_VERSION} and none is on PATH: install it from https://go.dev/dl/"
        )
    if go < MIN_GO:
        raise IotgwError(
            f"building InfluxDB {INFLUXD2_VERSION} needs Go {_shown(MIN_GO)} or newer, found "
            f"Go {_shown(go)}: install a newer one from https://go.dev/dl/ first on PATH"
        )
    if shutil.which("gcc") is None:
        raise IotgwError(
            f"gcc is needed once to build InfluxDB {INFLUXD2_VERSION} (cgo) and none is on "
            "PATH: install it, e.g. `apt-get install gcc`"
        )
    for tool in ("rustc", "cargo"):
        rust = _tool_version([tool, "--version"], rf"{tool} (\d+)\.(\d+)", env)
        if rust is None:
            raise IotgwError(
                f"Rust {_shown(MIN_RUST)} or newer is needed once to build InfluxDB "
                f"{INFLUXD2_VERSION} (its Flux engine) and {tool} is not on PATH: install "
                "Rust with rustup (https://rustup.rs)"
            )
        if rust < MIN_RUST:
            raise IotgwError(
                f"building InfluxDB {INFLUXD2_VERSION} needs Rust {_shown(MIN_RUST)} or newer, "
                f"found {tool} {_shown(rust)}: run `rustup update stable`, or put a newer "
                "Rust first on PATH"
            )
    return env


def _tool_version(
    command: list[str], pattern: str, env: dict[str, str] | None = None
) -> tuple[int, int] | None:
    """(major, minor) of a tool by what `command` prints; None when it is not on PATH.

    A tool that is there but prints no version (rustup's proxy without the toolchain asked
    for, say) is an IotgwError quoting it.
    """
    if shutil.which(command[0]) is None:
        return None
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}
    )
    match = re.search(pattern, result.stdout)
    if result.returncode or not match:
        said = " ".join((result.stderr or result.stdout).split())[:200]
        raise IotgwError(f"cannot tell the version of {command[0]}: {said or 'it prints none'}")
    return int(match.group(1)), int(match.group(2))


def _shown(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def influxd2_home() -> Path:
    """Where the built InfluxDB 2 lives (bin/influxd), shared by every stack and checkout."""
    return cache_dir() / f"influxdb-{INFLUXD2_VERSION}"


def ensure_influxd2(log: Path, report: Report) -> Path:
    """Build `influxd` 2.x from the Go module proxy once; later calls find it in the cache.

    The build runs in a staging folder renamed when done, and only a `.complete` marker
    says it is: an interrupted build is started afresh, never taken for done.
    """
    home = influxd2_home()
    if (home / ".complete").exists():
        return home / "bin" / "influxd"
    rust_env = influxd2_toolchain()
    started = time.monotonic()
    report(
        f"building InfluxDB {INFLUXD2_VERSION} from source, once: about 6 minutes with cold Go "
        f"and Cargo caches, under one with warm ones (log: {log})"
    )
    staging = home.with_name(home.name + ".partial")
    _remove(staging)
    (staging / "bin").mkdir(parents=True)
    _build_influxd2(staging, rust_env, log, report)
    _remove(home)
    staging.rename(home)
    (home / ".complete").write_text(INFLUXD2_VERSION + "\n")
    binary = home / "bin" / "influxd"
    report(f"built influxd {INFLUXD2_VERSION} in {time.monotonic() - started:.0f} s: {binary}")
    return binary


def _build_influxd2(staging: Path, rust_env: dict[str, str], log: Path, report: Report) -> None:
    """Build `staging`/bin/influxd; the source and the build's tools are removed after."""
    tools, source = staging / "tools", staging / "src"
    tools.mkdir()
    wrapper = tools / "rustc-caplints"
    wrapper.write_text(_RUSTC_CAPLINTS)
    wrapper.chmod(0o755)
    # Cgo asks pkg-config for Flux's flags; influxdata's wrapper answers, building libflux
    # (Flux's engine, in Rust) with cargo into Go's build cache on the way.
    env = {
        **os.environ,
        **rust_env,
        "PKG_CONFIG": str(tools / "pkg-config"),
        "RUSTC_WRAPPER": str(wrapper),
    }
    module = f"{INFLUXD2_MODULE}@v{INFLUXD2_VERSION}"
    influxd = [
        "go", "build", "-tags", "sqlite_foreign_keys,sqlite_json",
        "-ldflags", f"-X main.version={INFLUXD2_VERSION}",
        "-o", str(staging / "bin" / "influxd"), "./cmd/influxd",
    ]  # fmt: skip
    with log.open("ab") as out:

        def step(doing: str, command: list[str], cwd: Path) -> bytes:
            report(doing)
            result = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=out)
            out.write(result.stdout)
            out.flush()
            if result.returncode:
                raise IotgwError(
                    f"building InfluxDB {INFLUXD2_VERSION} failed while {doing}; see {log}"
                )
            return result.stdout

        downloaded = step(
            "downloading the module", ["go", "mod", "download", "-json", module], staging
        )
        shutil.copytree(json.loads(downloaded)["Dir"], source, copy_function=shutil.copyfile)
        _make_writable(source)
        # The wrapper's go.mod parser predates (and rejects) the toolchain directive.
        go_mod = source / "go.mod"
        lines = go_mod.read_text().splitlines(keepends=True)
        go_mod.write_text("".join(line for line in lines if not line.startswith("toolchain ")))
        step(
            "building the pkg-config wrapper",
            ["go", "build", "-o", str(tools / "pkg-config"), "github.com/influxdata/pkg-config"],
            source,
        )
        step(
            "building influxd (libflux with cargo first: the long part when cold)", influxd, source
        )
    _remove(source)
    _remove(tools)


def _make_writable(folder: Path) -> None:
    """Go's module cache is read-only, folders too: a copy must be made writable before
    it can be changed or removed."""
    folder.chmod(folder.stat().st_mode | 0o200)
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(parent, name)
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)


def _remove(folder: Path) -> None:
    if folder.exists():
        _make_writable(folder)
        shutil.rmtree(folder)


if __name__ == "__main__":
    # `python -m devstack.installer`: build InfluxDB 2 ahead, as `make test` does before the
    # tests (a cold build takes longer than a test may).
    build_log = influxd2_home().with_name(influxd2_home().name + ".log")
    build_log.parent.mkdir(parents=True, exist_ok=True)
    print(ensure_influxd2(build_log, print))
