"""CPU time and memory of a process and its children (a bridge is its session process and
its workers), read from /proc."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["process_tree", "rss_mb", "usage"]


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
