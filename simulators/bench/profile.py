"""Where a subject's time goes: py-spy samples of every process, summed per stage.

`iotgw bench --profile` records the bridge (its session process and its workers) with
py-spy while it drains, writes the raw stacks (`<out>/profile-<run>.txt`, loadable by
speedscope or flamegraph.pl after `py-spy`'s collapsed format) and a table of the share
of samples per stage. A sample is charged to the innermost frame of a known stage, so
time in a library called by a stage (pydantic inside validation) is that stage's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from gateway.errors import IotgwError

__all__ = ["STAGES", "Recording", "stages"]

# Stage by the path of a frame's file, first match wins; checked from the innermost frame.
STAGES: tuple[tuple[str, str], ...] = (
    ("metrics", r"prometheus_client/"),
    ("registry and rate limit", r"gateway/(domain/ratelimit|services/registry)\.py"),
    ("decode and validation", r"gateway/domain/validation\.py|pydantic"),
    ("kafka batching and send", r"gateway/services/bridge/publisher\.py|aiokafka/"),
    ("hand-off to workers", r"gateway/services/bridge/(session|worker)\.py"),
    ("mqtt receive and acknowledge", r"gateway/adapters/mqtt_session\.py"),
    ("event loop and sockets", r"asyncio/|uvloop|selectors\.py|socket\.py"),
)
_FRAME = re.compile(r"\(([^()]*?):\d+\)$")


class Recording:
    """py-spy recording one process tree until stopped; the raw stacks go to `path`."""

    def __init__(self, pid: int, path: Path, rate: int = 250) -> None:
        # The venv's scripts need not be on PATH: look beside the running interpreter first.
        spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.defpath}")
        if spy is None:
            raise IotgwError("--profile needs py-spy: `pip install '.[bench]'` (make setup does)")
        self.path = path
        self._process = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate),
             "--format", "raw", "--output", str(path), "--nonblocking"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # Sampling has begun once it says so; stopped before that, it would write nothing.
        assert self._process.stdout is not None
        said: list[str] = []
        while "Sampling process" not in (line := self._process.stdout.readline()):
            if not line:
                raise IotgwError(f"py-spy could not sample pid {pid}: {' '.join(said)[-300:]}")
            said.append(line.strip())
        # py-spy says so a moment before it installs its Control-C handler, and a SIGINT in
        # between kills it before it writes anything: wait until the kernel shows the handler.
        deadline = time.monotonic() + 10
        while not _catches_sigint(self._process.pid):
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise IotgwError(f"py-spy could not sample pid {pid}: it never got ready")
            time.sleep(0.01)

    def stop(self) -> dict[str, float]:
        """Stop sampling; the share of samples per stage, largest first."""
        self._process.send_signal(signal.SIGINT)
        said, _ = self._process.communicate(timeout=30)
        if not self.path.exists():
            code = self._process.returncode
            raise IotgwError(f"py-spy wrote no profile (exit {code}): {said.strip()[-500:]}")
        return stages(self.path)


def _catches_sigint(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGINT (its SigCgt mask, /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)
    return False


def stages(path: Path) -> dict[str, float]:
    """Share of the samples in a py-spy raw file per stage ("other" for the rest)."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        counts[_stage(stack.split(";"))] += int(samples)
    total = sum(counts.values()) or 1
    return {name: round(n / total, 3) for name, n in counts.most_common()}


def _stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        match = _FRAME.search(frame)
        where = match.group(1) if match else frame
        for name, pattern in STAGES:
            if re.search(pattern, where):
                return name
    return "other"
