"""The `iotgw` command line: one typer app made of the command groups of gateway/cli/."""

from __future__ import annotations

import logging
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from gateway.cli.bench import bench_app
from gateway.cli.broker import broker_app
from gateway.cli.devices import devices_app
from gateway.cli.influx import influx_app
from gateway.cli.pending import add_pending_commands
from gateway.cli.rules import rules_app
from gateway.cli.run import run_app
from gateway.cli.simulate import simulate_app
from gateway.cli.stack import stack_app
from gateway.cli.tail import tail_app
from gateway.cli.terminal import print_error
from gateway.cli.topics import topics_app
from gateway.cli.types import types_app
from gateway.errors import IotgwError
from gateway.services.runtime import configure_logging

__all__ = ["app", "main"]


class _OneLineErrors(TyperGroup):
    """Every command's IotgwError becomes one line on stderr and its exit code."""

    # Typed Any: typer's base class types it with its vendored, private click.Context.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except IotgwError as exc:
            print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    cls=_OneLineErrors,
    help="iotgw: MQTT sensor readings validated into Apache Kafka, InfluxDB and alerts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(influx_app, name="influx")
add_pending_commands(devices_app)
app.add_typer(devices_app, name="devices")
app.add_typer(broker_app, name="broker")
app.add_typer(run_app, name="run")
app.add_typer(rules_app, name="rules")
app.add_typer(types_app, name="types")
# Groups without a name add their commands at the top: simulate, audit, tail, bench.
for commands in (simulate_app, tail_app, bench_app):
    app.add_typer(commands)


def main() -> None:
    """Entry point of the `iotgw` script."""
    configure_logging(logging.WARNING)
    # A command reports a failed connection itself, in one line; the clients' own
    # retry logs would only repeat it.
    for client in ("aiokafka", "gmqtt"):
        logging.getLogger(client).setLevel(logging.CRITICAL)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
