"""Mosquitto builds other than the local stack's, taken from Debian without installing them.

bookworm-backports has Mosquitto 2.0.21 (the Compose deployment runs 2.0.22, which is not
packaged for Debian 12). A private apt configuration (its own sources list, package lists
and cache, under the iotgw cache folder) reads that suite without touching the machine's
apt sources; `apt-get download` and `dpkg -x` unpack the packages into a folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from devstack.installer import cache_dir
from gateway.errors import IotgwError

BACKPORTS_MOSQUITTO = "2.0.21-1~bpo12+1"
_SUITES = ("bookworm-backports", "bookworm")
_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Mosquitto 2.0.21 and the libraries it links that Debian 12's 2.0.11 may not have pulled.
_PACKAGES = (f"mosquitto={BACKPORTS_MOSQUITTO}", "libwebsockets17", "libcjson1", "libdlt2")


@dataclass(frozen=True)
class MosquittoBuild:
    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "usr" / "sbin" / "mosquitto"

    @property
    def environment(self) -> dict[str, str]:
        return {**os.environ, "LD_LIBRARY_PATH": str(self.root / "usr/lib/x86_64-linux-gnu")}


def backports_mosquitto(log: Path) -> MosquittoBuild:
    """Mosquitto 2.0.21 unpacked into the cache (fetched once, about 1 MB)."""
    build = MosquittoBuild(cache_dir() / f"mosquitto-{BACKPORTS_MOSQUITTO}")
    done = build.root / ".complete"
    if done.exists():
        return build
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise IotgwError("fetching Mosquitto from bookworm-backports needs apt-get and dpkg")
    apt = cache_dir() / "apt-backports"
    for folder in ("lists/partial", "cache/archives/partial", "debs"):
        (apt / folder).mkdir(parents=True, exist_ok=True)
    sources = apt / "sources.list"
    sources.write_text(
        "".join(f"deb [signed-by={_KEYRING}] http://deb.debian.org/debian {s} main\n"
                for s in _SUITES)
    )  # fmt: skip
    options = [
        "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "APT::Sandbox::User=root", "-q",
    ]  # fmt: skip
    with log.open("ab") as out:
        for command, where in (
            (["apt-get", *options, "update"], apt),
            (["apt-get", *options, "download", *_PACKAGES], apt / "debs"),
        ):
            if subprocess.run(command, cwd=where, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise IotgwError(f"`{' '.join(command[:1] + command[-3:])}` failed; see {log}")
    staging = build.root.with_name(build.root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for deb in sorted((apt / "debs").glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
    shutil.rmtree(build.root, ignore_errors=True)
    staging.rename(build.root)
    done.write_text(BACKPORTS_MOSQUITTO + "\n")
    return build
