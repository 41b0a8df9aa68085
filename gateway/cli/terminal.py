"""Terminal output shared by the commands: rich consoles for results and one-line errors."""

from __future__ import annotations

from rich.console import Console

__all__ = ["console", "errors", "print_error", "say"]

console = Console()
errors = Console(stderr=True)


def say(message: str) -> None:
    """A progress line."""
    console.print(f"[dim]•[/dim] {message}", highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """Each line of `message` as `iotgw: error: ...` on stderr."""
    for line in message.splitlines():
        errors.print(f"iotgw: error: {line}", highlight=False, markup=False, soft_wrap=True)
