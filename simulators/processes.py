"""iotgw's services as processes of their own, for tests, the demo and the benchmarks:
started with given settings, ready by their `/readyz`, and measured (CPU time and memory
of a process and its children, from /proc)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import CONTROLLER_PORT_OFFSET
from gateway.errors import IotgwError
from gateway.settings import Settings

__all__ = ["ServiceProcess", "free_ports", "process_tree", "rss_mb", "usage"]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants that are alive now."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                pending += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int) -> float:
    """Resident memory of the process and its children now, in MB."""
    return sum(_status_kb(p, "VmRSS") for p in process_tree(pid)) / 1024


def usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MB) of the process and its children: CPU summed, and the sum
    of each one's peak resident memory."""
    cpu = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, sum(_status_kb(p, "VmHWM") for p in process_tree(pid)) / 1024


def free_ports(count: int, step: int = 1) -> int:
    """A base port on 127.0.0.1 such that base, base+step, ... and each +100 (a Kafka
    node's controller port) are free now."""
    for base in range(20000, 60000, 37):
        wanted = [base + i * step for i in range(count)]
        wanted += [port + CONTROLLER_PORT_OFFSET for port in wanted]
        if all(_free(port) for port in wanted):
            return base
    raise IotgwError("no free ports on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ServiceProcess:
    """`iotgw run SERVICE` as its own process, configured by `settings` through its
    environment (Settings.environment()), ready once its `/readyz` answers 200.

    Its metrics and health listen on a port of its own (`run all`: four, one a service:
    bridge, writer, rules engine, state).
    """

    def __init__(self, service: str, settings: Settings, log: Path, *options: str) -> None:
        services = 4 if service == "all" else 1
        port = free_ports(services)
        self.settings = settings.model_copy(update={"metrics_port": port})
        self.urls = [f"http://127.0.0.1:{port + n}" for n in range(services)]
        self.service, self.log, self.options = service, log, options
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None, "not started"
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> ServiceProcess:
        with self.log.open("ab") as out:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", self.service, *self.options],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.settings.environment()},
                # Its own session: a Ctrl-C meant for the caller does not reach it, the
                # caller stops it gracefully.
                start_new_session=True,
            )
        return self

    async def ready(self, timeout_s: float = 60) -> None:
        """Wait until every `/readyz` of it answers 200; IotgwError if it exits first."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.urls)
        while pending:
            code = self.process.poll()
            if code is not None:
                raise IotgwError(f"iotgw run {self.service} exited ({code}); see {self.log}")
            if time.monotonic() > deadline:
                raise IotgwError(f"iotgw run {self.service} not ready in {timeout_s:.0f} s")
            if await asyncio.to_thread(_answers, pending[0] + "/readyz"):
                pending.pop(0)
            else:
                await asyncio.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        """Its Prometheus metrics now, by sample name (the first service's, for `all`)."""
        with urllib.request.urlopen(self.urls[0] + "/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def stop(self, timeout_s: float = 15) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; its exit code."""
        process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
