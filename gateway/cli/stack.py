"""`iotgw stack`: the local stack (Mosquitto, Apache Kafka, InfluxDB) as processes.

The stack lives in devstack/, in a checkout of iotgw only: not in the runtime package or
image, so it is imported when a stack command runs.
"""

from __future__ import annotations

import asyncio
import shlex
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from gateway.adapters.mosquitto_auth import GATEWAY_USER
from gateway.cli.terminal import console, say
from gateway.cli.topics import topic_table
from gateway.errors import IotgwError
from gateway.settings import load_settings

if TYPE_CHECKING:
    from types import ModuleType

    from devstack.stack import ServerStatus

__all__ = ["devstack", "stack_app"]

stack_app = typer.Typer(
    help="The local stack: Mosquitto, Apache Kafka and InfluxDB as processes.",
    no_args_is_help=True,
)

StackDir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Folder of the stack's configs, data, logs and pid files.",
        show_default=".stack in the checkout",
    ),
]


def devstack() -> ModuleType:
    """devstack.stack, or IotgwError when iotgw is installed without its checkout."""
    try:
        from devstack import stack
    except ImportError:
        raise IotgwError(
            "the local stack runs from a checkout of iotgw (devstack/ is not installed here)"
        ) from None
    return stack


def _server_table(servers: list[ServerStatus]) -> Table:
    table = Table("server", "pid", "address", "state")
    for server in servers:
        state = "[green]up[/green]" if server.up else "[red]down[/red]"
        table.add_row(server.name, str(server.pid or "-"), server.address, state)
    return table


class InfluxVersion(StrEnum):
    """The InfluxDB the stack runs, as `--influxdb` names it."""

    V1 = "1"
    V2 = "2"


@stack_app.command("up")
def stack_up(
    kafka_brokers: Annotated[
        int, typer.Option(min=1, max=9, help="Kafka nodes; 3 gives replication 3, min ISR 2.")
    ] = 1,
    mqtt_port: Annotated[
        int, typer.Option(help="Mosquitto's plain port (loopback, anonymous).")
    ] = 1883,
    mqtts_port: Annotated[
        int | None,
        typer.Option(help="Mosquitto's TLS port with logins [default: MQTT port + 7000]."),
    ] = None,
    kafka_port: Annotated[int, typer.Option(help="First Kafka broker's port.")] = 9092,
    influx_port: Annotated[int, typer.Option(help="InfluxDB's HTTP port.")] = 8086,
    kafka_advertised_port: Annotated[
        int | None,
        typer.Option(help="One broker: the port clients are told to use (a proxy in front)."),
    ] = None,
    influxdb: Annotated[
        InfluxVersion,
        typer.Option(
            "--influxdb",
            help="1: Debian's InfluxDB 1.6.7, installed in seconds; 2: InfluxDB 2.7, built "
            "from source once (Go, Rust and gcc; about 6 min cold, then cached).",
        ),
    ] = InfluxVersion.V1,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for each server (default per server).")
    ] = None,
    root: StackDir = None,
) -> None:
    """Install what is missing, start the servers, wait until they serve, create topics."""
    stack = devstack()
    root = root or stack.DEFAULT_STACK_DIR
    settings = load_settings()
    plan = stack.StackPlan(
        root, mqtt_port, kafka_port, kafka_brokers, influx_port, mqtts_port=mqtts_port,
        kafka_advertised_port=kafka_advertised_port, influx_version=int(influxdb.value),
    )  # fmt: skip
    result = asyncio.run(stack.up(plan, settings, report=say, timeout_s=timeout))
    console.print(_server_table(result.servers))
    if result.topics:
        console.print(topic_table(result.topics))
    if "mosquitto" in plan.kinds:
        console.print(
            f"secure MQTT: mqtts://{stack.HOST}:{plan.secure_mqtt_port} (CA {plan.certs.ca_cert}; "
            f"gateway login {GATEWAY_USER}, its password in {plan.gateway_password_file})",
            soft_wrap=True,
            highlight=False,
        )
    if "influxdb" in plan.kinds and plan.influx_version == 2:
        influx = stack.influx_settings(plan, settings)
        console.print(
            "InfluxDB 2.7: the gateway writes to it with\n"
            f"export IOTGW_INFLUX_ORG={influx.influx_org}\n"
            f"export IOTGW_INFLUX_BUCKET={influx.influx_bucket}\n"
            f'export IOTGW_INFLUX_TOKEN="$(cat {shlex.quote(str(plan.influx_token_file))})"',
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
    console.print(
        f"stack ready in {result.seconds:.1f} s (Apache Kafka {result.kafka_version}); "
        f"logs in {root / 'logs'}; stop it with `iotgw stack down`",
        soft_wrap=True,
    )


@stack_app.command("down")
def stack_down(
    purge: Annotated[bool, typer.Option(help="Also delete the stack's data and logs.")] = False,
    root: StackDir = None,
) -> None:
    """Stop the servers this stack started (by their pid files)."""
    stack = devstack()
    stopped = stack.down(root or stack.DEFAULT_STACK_DIR, purge=purge, report=say)
    console.print(f"stopped {len(stopped)} server(s)" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status(root: StackDir = None) -> None:
    """Show each server of the stack: pid, address, up or down. Exit 1 if any is down."""
    stack = devstack()
    root = root or stack.DEFAULT_STACK_DIR
    servers = stack.status(root)
    if not servers:
        console.print(f"no stack in {root}: start one with `iotgw stack up`")
        raise typer.Exit(1)
    console.print(_server_table(servers))
    if not all(server.up for server in servers):
        raise typer.Exit(1)
