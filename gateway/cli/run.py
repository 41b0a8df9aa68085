"""`iotgw run`: the services in the foreground, until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated

import typer

from gateway.errors import IotgwError
from gateway.services.bridge.session import Bridge
from gateway.services.rules import RulesService
from gateway.services.runtime import serve
from gateway.services.state import StateService
from gateway.services.writer import Writer
from gateway.settings import Settings, load_settings

__all__ = ["run_app", "run_services"]

run_app = typer.Typer(help="Run iotgw's services in the foreground.", no_args_is_help=True)


@run_app.command("bridge")
def run_bridge(
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=64,
            help="Worker processes behind the one MQTT session.",
            show_default="IOTGW_BRIDGE_WORKERS, else 1",
        ),
    ] = None,
) -> None:
    """MQTT readings in, validated, into Kafka; each acknowledged only after Kafka did,
    in the order they arrived."""
    settings = load_settings()
    if workers is not None:
        settings = settings.model_copy(update={"bridge_workers": workers})
    serve(Bridge(settings).run, settings.log_format)


@run_app.command("writer")
def run_writer() -> None:
    """Readings, alerts and dead letters from Kafka into InfluxDB, in batches."""
    settings = load_settings()
    serve(Writer(settings).run, settings.log_format)


@run_app.command("rules")
def run_rules() -> None:
    """The rules engine: alerts from readings, MQTT commands and webhooks on firing."""
    settings = load_settings()
    serve(RulesService(settings).run, settings.log_format)


@run_app.command("state")
def run_state() -> None:
    """Each device's last-known state (iot.devices.state), merged from its readings and
    availability."""
    settings = load_settings()
    serve(StateService(settings).run, settings.log_format)


@run_app.command("all")
def run_all() -> None:
    """The bridge, the writer, the rules engine and the state in one process (small sites,
    the demo)."""
    settings = load_settings()
    serve(functools.partial(run_services, settings), settings.log_format)


async def run_services(settings: Settings, stop: asyncio.Event) -> None:
    """The bridge, the writer, the rules engine and the state in one process, stopped
    together."""

    def port(offset: int) -> Settings:
        # One fixed port given: the writer takes the next one, the rules engine the one
        # after, the state service the one after that.
        if not settings.metrics_port:
            return settings
        return settings.model_copy(update={"metrics_port": settings.metrics_port + offset})

    rules = RulesService(port(2))
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(Bridge(settings).run(stop))
            group.create_task(Writer(port(1)).run(stop))
            group.create_task(rules.run(stop))
            group.create_task(StateService(port(3)).run(stop))
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        if isinstance(first, IotgwError):
            raise first from None
        raise
