"""`iotgw tail`: a live view of validated readings."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from gateway.cli.terminal import errors
from gateway.domain.records import CanonicalReading
from gateway.services.tail import format_reading, tail
from gateway.settings import load_settings
from gateway.topics import Topics

__all__ = ["tail_app"]

# Its command is a top-level one: `iotgw tail`.
tail_app = typer.Typer()


@tail_app.command("tail")
def tail_command(
    device: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many readings.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print canonical JSON lines.")] = False,
) -> None:
    """Live view of validated readings as they reach iot.readings (Ctrl-C stops)."""
    settings = load_settings()

    def emit(reading: CanonicalReading) -> None:
        print(json.dumps(reading) if as_json else format_reading(reading), flush=True)

    def ready() -> None:
        errors.print(
            f"following {Topics(settings.topic_prefix).readings}"
            + (f" for {device}" if device else ""),
            highlight=False,
        )

    asyncio.run(tail(settings, emit, device=device, count=count, on_ready=ready))
