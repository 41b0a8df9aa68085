"""Terminal output shared by the commands: rich consoles for results and one-line errors."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

__all__ = ["console", "errors", "print_error", "say", "utc_time"]

console = Console()
errors = Console(stderr=True)


def say(message: str) -> None:
    """A progress line."""
    console.print(f"[dim]•[/dim] {message}", highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """Each line of `message` as `iotgw: error: ...` on stderr."""
    for line in message.splitlines():
        errors.print(f"iotgw: error: {line}", highlight=False, markup=False, soft_wrap=True)


def utc_time(ms: int) -> str:
    """Epoch milliseconds as `2026-11-27T03:16:29Z`."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
