"""The `iotgw` command line: one typer app whose commands run every part of iotgw."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from devstack import stack
from gateway.adapters.certs import ensure_certificates
from gateway.adapters.kafka import TopicResult, ensure_topics
from gateway.adapters.mosquitto_auth import GATEWAY_USER, PasswordFile
from gateway.cli.devices import devices_app
from gateway.cli.terminal import console, errors, print_error, say
from gateway.domain.rules_file import load_rules
from gateway.errors import IotgwError
from gateway.services.bridge.session import Bridge
from gateway.services.rules import RulesService
from gateway.services.runtime import LOG_FORMAT, service_logging
from gateway.services.tail import format_reading, tail
from gateway.services.writer import Writer
from gateway.settings import Settings, load_settings
from gateway.topics import Topics
from simulators.audit import SendLog, audit_until_settled
from simulators.bench.harness import DEFAULT_RUNS, RUNS, bench, bench_table
from simulators.fleet import parse_faults
from simulators.runner import audit_table, run_simulation


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
stack_app = typer.Typer(
    help="The local stack: Mosquitto, Apache Kafka and InfluxDB as processes.",
    no_args_is_help=True,
)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
run_app = typer.Typer(help="Run iotgw's services in the foreground.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
app.add_typer(devices_app, name="devices")
app.add_typer(run_app, name="run")

StackDir = Annotated[
    Path, typer.Option("--dir", help="Folder of the stack's configs, data, logs and pid files.")
]


def _server_table(servers: list[stack.ServerStatus]) -> Table:
    table = Table("server", "pid", "address", "state")
    for server in servers:
        state = "[green]up[/green]" if server.up else "[red]down[/red]"
        table.add_row(server.name, str(server.pid or "-"), server.address, state)
    return table


def _topic_table(topics: list[TopicResult]) -> Table:
    table = Table("topic", "partitions", "replication", "")
    for topic in topics:
        table.add_row(
            topic.name, str(topic.partitions), str(topic.replication),
            "created" if topic.created else "exists",
        )  # fmt: skip
    return table


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
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for each server (default per server).")
    ] = None,
    root: StackDir = stack.DEFAULT_STACK_DIR,
) -> None:
    """Install what is missing, start the servers, wait until they serve, create topics."""
    settings = load_settings()
    plan = stack.StackPlan(
        root, mqtt_port, kafka_port, kafka_brokers, influx_port, mqtts_port=mqtts_port,
        kafka_advertised_port=kafka_advertised_port,
    )  # fmt: skip
    result = asyncio.run(stack.up(plan, settings, report=say, timeout_s=timeout))
    console.print(_server_table(result.servers))
    if result.topics:
        console.print(_topic_table(result.topics))
    if "mosquitto" in plan.kinds:
        console.print(
            f"secure MQTT: mqtts://{stack.HOST}:{plan.secure_mqtt_port} (CA {plan.certs.ca_cert}; "
            f"gateway login {GATEWAY_USER}, its password in {plan.gateway_password_file})",
            soft_wrap=True,
            highlight=False,
        )
    console.print(
        f"stack ready in {result.seconds:.1f} s (Apache Kafka {result.kafka_version}); "
        f"logs in {root / 'logs'}; stop it with `iotgw stack down`",
        soft_wrap=True,
    )


@stack_app.command("down")
def stack_down(
    purge: Annotated[bool, typer.Option(help="Also delete the stack's data and logs.")] = False,
    root: StackDir = stack.DEFAULT_STACK_DIR,
) -> None:
    """Stop the servers this stack started (by their pid files)."""
    stopped = stack.down(root, purge=purge, report=say)
    console.print(f"stopped {len(stopped)} server(s)" if stopped else "nothing was running")


@stack_app.command("status")
def stack_status(root: StackDir = stack.DEFAULT_STACK_DIR) -> None:
    """Show each server of the stack: pid, address, up or down. Exit 1 if any is down."""
    servers = stack.status(root)
    if not servers:
        console.print(f"no stack in {root}: start one with `iotgw stack up`")
        raise typer.Exit(1)
    console.print(_server_table(servers))
    if not all(server.up for server in servers):
        raise typer.Exit(1)


@topics_app.command("create")
def topics_create() -> None:
    """Create iotgw's topics on the configured Kafka; existing topics are left as they are."""
    settings = load_settings()
    console.print(_topic_table(asyncio.run(ensure_topics(settings))))


broker_app = typer.Typer(
    help="The MQTT broker's TLS certificate and the gateway's login (deployments).",
    no_args_is_help=True,
)
app.add_typer(broker_app, name="broker")


@broker_app.command("init")
def broker_init(
    certs_dir: Annotated[
        Path, typer.Option(help="Where ca.crt, ca.key, server.crt and server.key live.")
    ],
    host: Annotated[
        list[str], typer.Option(help="A name (or IP) devices reach the broker by; repeatable.")
    ],
    ca_key_dir: Annotated[
        Path | None,
        typer.Option(help="Keep ca.key here instead, out of what the broker mounts."),
    ] = None,
) -> None:
    """Make the CA (once) and the broker's server certificate, and store the gateway's login
    (the user and password of IOTGW_MQTT_URL) in IOTGW_MQTT_PASSWORD_FILE.

    The local stack does this itself; Docker Compose runs it before Mosquitto starts.
    """
    settings = load_settings()
    endpoint = settings.mqtt
    if settings.mqtt_password_file is None:
        raise IotgwError("set IOTGW_MQTT_PASSWORD_FILE: the broker's password file", exit_code=2)
    if endpoint.username != GATEWAY_USER or endpoint.password is None:
        raise IotgwError(
            f"IOTGW_MQTT_URL must log in as {GATEWAY_USER} with a password "
            f"(mqtts://{GATEWAY_USER}:PASSWORD@HOST:8883): the ACL gives that user "
            "the gateway's rights",
            exit_code=2,
        )
    files = ensure_certificates(certs_dir, host, key_folder=ca_key_dir)
    passwords = PasswordFile(settings.mqtt_password_file)
    password = endpoint.password.get_secret_value()
    if not passwords.check(GATEWAY_USER, password):
        passwords.set(GATEWAY_USER, password)
    console.print(
        f"CA {files.ca_cert} (give it to devices); server certificate for {', '.join(host)}; "
        f"gateway login {GATEWAY_USER} in {passwords.path}",
        highlight=False,
        soft_wrap=True,
    )


Service = Callable[[asyncio.Event], Awaitable[None]]


def _serve(build: Callable[[Settings], Service]) -> None:
    """Load the settings, build the service, run it until SIGINT or SIGTERM, which start
    its graceful shutdown."""
    service = build(load_settings())
    service_logging()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await service(stop)

    asyncio.run(main())


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

    def build(settings: Settings) -> Service:
        if workers is not None:
            settings = settings.model_copy(update={"bridge_workers": workers})
        return Bridge(settings).run

    _serve(build)


async def run_services(settings: Settings, stop: asyncio.Event) -> None:
    """The bridge, the writer and the rules engine in one process, stopped together."""

    def port(offset: int) -> Settings:
        # One fixed port given: the writer takes the next one, the rules engine the one after.
        if not settings.metrics_port:
            return settings
        return settings.model_copy(update={"metrics_port": settings.metrics_port + offset})

    rules = RulesService(port(2))
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(Bridge(settings).run(stop))
            group.create_task(Writer(port(1)).run(stop))
            group.create_task(rules.run(stop))
    except ExceptionGroup as failed:
        first = failed.exceptions[0]
        if isinstance(first, IotgwError):
            raise first from None
        raise


@run_app.command("all")
def run_all() -> None:
    """The bridge, the writer and the rules engine in one process (small sites, the demo)."""
    _serve(lambda settings: functools.partial(run_services, settings))


@run_app.command("rules")
def run_rules() -> None:
    """The rules engine: alerts from readings, MQTT commands and webhooks on firing."""
    _serve(lambda settings: RulesService(settings).run)


rules_app = typer.Typer(help="Alerting rules.", no_args_is_help=True)
app.add_typer(rules_app, name="rules")


@rules_app.command("validate")
def rules_validate(
    file: Annotated[Path, typer.Argument(help="A rules file (YAML).")],
) -> None:
    """Check a rules file; print every problem with its line and field."""
    rules = load_rules(file).rules
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(r.kind for r in rules).items()))
    console.print(f"{file}: {len(rules)} rules ({kinds})", highlight=False)


@run_app.command("writer")
def run_writer() -> None:
    """Readings, alerts and dead letters from Kafka into InfluxDB, in batches."""
    _serve(lambda settings: Writer(settings).run)


@app.command("simulate")
def simulate_command(
    devices: Annotated[int, typer.Option(min=1, max=100_000, help="Devices in the fleet.")] = 50,
    rate: Annotated[
        float, typer.Option(min=0.1, max=100_000, help="Readings per second, whole fleet.")
    ] = 50.0,
    duration: Annotated[float, typer.Option(min=0.1, max=86_400, help="Seconds to run.")] = 60.0,
    qos: Annotated[int, typer.Option(min=0, max=1, help="MQTT QoS of the readings.")] = 1,
    faults: Annotated[
        str, typer.Option(help="Fault rates per reading, e.g. malformed=0.01,duplicate=0.02.")
    ] = "",
    register: Annotated[bool, typer.Option(help="Register the fleet first.")] = False,
    log: Annotated[Path | None, typer.Option(help="Write one JSON line per reading sent.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same fleet and signals.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, max=100, help="Readings per message.")] = 1,
) -> None:
    """Play a fleet of devices against the configured MQTT broker (bounded in time)."""
    settings = load_settings()
    try:
        fault_rates = parse_faults(faults)
    except ValueError as exc:
        raise IotgwError(str(exc), exit_code=2) from None
    stats = asyncio.run(
        run_simulation(
            settings,
            devices=devices,
            rate=rate,
            duration=duration,
            qos=qos,
            faults=fault_rates,
            register=register,
            log=log,
            seed=seed,
            batch_size=batch_size,
        )
    )
    faulted = ", ".join(f"{k} {v}" for k, v in sorted(stats.faults.items())) or "none"
    console.print(
        f"sent {stats.readings} readings in {stats.messages} messages over {stats.seconds:.1f} s "
        f"({stats.readings / max(stats.seconds, 0.001):.0f}/s); faults: {faulted}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("audit")
def audit_command(
    log: Annotated[Path, typer.Option(help="The log of `iotgw simulate --log`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the pipeline to catch up.")
    ] = 0.0,
) -> None:
    """Compare what a simulation sent with iot.readings, iot.readings.dlq and InfluxDB.

    Exits 1 when a valid reading is in neither topic, or is more than one point in InfluxDB.
    """
    settings = load_settings()
    report = asyncio.run(audit_until_settled(settings, SendLog.read(log), wait))
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        console.print(audit_table(report))
    if report.lost or report.duplicates_in_influx:
        raise typer.Exit(1)


@app.command("tail")
def tail_command(
    device: Annotated[str | None, typer.Option(help="Only this device.")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Stop after this many readings.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print canonical JSON lines.")] = False,
) -> None:
    """Live view of validated readings as they reach iot.readings (Ctrl-C stops)."""
    settings = load_settings()

    def emit(reading: dict[str, Any]) -> None:
        print(json.dumps(reading) if as_json else format_reading(reading), flush=True)

    def ready() -> None:
        errors.print(
            f"following {Topics(settings.topic_prefix).readings}"
            + (f" for {device}" if device else ""),
            highlight=False,
        )

    asyncio.run(tail(settings, emit, device=device, count=count, on_ready=ready))


@app.command("bench")
def bench_command(
    readings: Annotated[int, typer.Option(min=100, help="Backlog to drain per run.")] = 200_000,
    live: Annotated[int, typer.Option(min=10, help="Readings published live per run.")] = 50_000,
    rates: Annotated[str, typer.Option(help="Fixed rates for the latency runs.")] = "1000,5000",
    seconds: Annotated[float, typer.Option(min=0.5, help="Seconds per latency run.")] = 5.0,
    runs: Annotated[
        str, typer.Option(help=f"Which runs, comma-separated, of {', '.join(RUNS)}.")
    ] = ",".join(DEFAULT_RUNS),
    out: Annotated[Path, typer.Option(help="Where latest.json and latest.png go.")] = Path(
        "bench-results"
    ),
) -> None:
    """iotgw against the raw ceiling (mosquitto_sub | a console producer) and a naive bridge."""
    settings = load_settings()
    chosen = [r.strip() for r in runs.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in RUNS]
    if unknown or not chosen:
        raise IotgwError(f"runs must be among {', '.join(RUNS)}", exit_code=2)
    try:
        rate_values = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        raise IotgwError("--rates takes numbers, like 1000,5000", exit_code=2) from None
    logging.getLogger("gmqtt").setLevel(logging.CRITICAL)
    results = asyncio.run(
        bench(
            settings,
            readings=readings,
            live=live,
            rates=rate_values,
            seconds=seconds,
            runs=chosen,
            out=out,
            report=say,
        )
    )
    console.print(bench_table(results))
    console.print(f"results: {out / 'latest.json'}, chart: {out / 'latest.png'}", highlight=False)


def main() -> None:
    """Entry point of the `iotgw` script."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    # A command reports a failed connection itself, in one line; the clients' own
    # retry logs would only repeat it.
    for client in ("aiokafka", "gmqtt"):
        logging.getLogger(client).setLevel(logging.CRITICAL)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
