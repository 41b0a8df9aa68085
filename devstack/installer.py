"""Installs what the local stack runs: Debian packages, Java 17, and Kafka's jars via Maven."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
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
