"""The local stack: Mosquitto, Apache Kafka (KRaft) and InfluxDB (1.x or 2.x) as processes
under `.stack/`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template

import httpx
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from devstack.installer import (
    KafkaDistribution,
    ensure_debian_packages,
    ensure_influxd2,
    ensure_java,
    ensure_kafka,
)
from gateway.adapters.certs import CertFiles, ensure_certificates
from gateway.adapters.files import write_atomically
from gateway.adapters.influx import InfluxClient, influx_reason
from gateway.adapters.kafka import TopicResult, broker_ids, ensure_topics
from gateway.adapters.mosquitto_auth import GATEWAY_USER, PasswordFile, generate_password
from gateway.adapters.mqtt import broker_answers
from gateway.errors import IotgwError
from gateway.services.influx_setup import setup_influx
from gateway.settings import MqttEndpoint, Settings

Report = Callable[[str], None]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCAL_TEMPLATES = PROJECT_ROOT / "compose" / "local"
# The local stack's Mosquitto config (two listeners); the ACL is the Compose deployment's.
MOSQUITTO_CONFIG = LOCAL_TEMPLATES / "mosquitto.conf"
MOSQUITTO_ACL = PROJECT_ROOT / "compose" / "mosquitto" / "acl"
# The Compose deployment's config: one authenticated listener, per_listener_settings false.
COMPOSE_MOSQUITTO_CONFIG = PROJECT_ROOT / "compose" / "mosquitto" / "mosquitto.conf"
# Mosquitto from this version on, with per_listener_settings true, delivers none of an
# offline persistent session's backlog (upstream #2618, open after 2.0.22).
MOSQUITTO_BACKLOG_BUG_SINCE = (2, 0, 12)
DEFAULT_STACK_DIR = PROJECT_ROOT / ".stack"
SERVER_KINDS = ("mosquitto", "kafka", "influxdb")
HOST = "127.0.0.1"

# A Kafka node's controller listens this far above its broker port.
CONTROLLER_PORT_OFFSET = 100
# Mosquitto's TLS listener listens this far above its plain one: 1883 -> 8883.
SECURE_MQTT_PORT_OFFSET = 7000
# The names the local broker's server certificate is valid for.
LOCAL_HOSTNAMES = [HOST, "localhost"]
# Kafka's controlled shutdown moves partition leadership away first; give it time
# before the stack falls back to SIGKILL.
STOP_TIMEOUT_S = 30.0
PROBE_INTERVAL_S = 0.25
# InfluxDB 2.x: where its files live (beside, never inside, a 1.x data folder), and the
# organisation and user its first start sets up.
INFLUX2_FOLDER = "influxdb2"
INFLUX2_ORG = "iotgw"
INFLUX2_USER = "iotgw"


def _ignore(_: str) -> None:
    """A report that says nothing."""


@dataclass(frozen=True)
class StackPlan:
    """Which servers to run, where their files live and which loopback ports they take."""

    root: Path = DEFAULT_STACK_DIR
    mqtt_port: int = 1883
    kafka_port: int = 9092
    kafka_brokers: int = 1
    influx_port: int = 8086
    kinds: tuple[str, ...] = SERVER_KINDS
    # Mosquitto's TLS listener; the MQTT port + 7000 when not given.
    mqtts_port: int | None = None
    # One broker only: the port it tells clients to connect to, when a proxy stands in
    # front of it (the broker's own port when not given).
    kafka_advertised_port: int | None = None
    # 1: Debian's InfluxDB 1.6.7; 2: InfluxDB 2.7, built from source once.
    influx_version: int = 1

    def __post_init__(self) -> None:
        if self.mqtts_port is None:
            object.__setattr__(self, "mqtts_port", self.mqtt_port + SECURE_MQTT_PORT_OFFSET)
        if not 1 <= self.kafka_brokers <= 9:
            raise IotgwError("--kafka-brokers must be from 1 to 9", exit_code=2)
        if self.kafka_advertised_port is not None and self.kafka_brokers != 1:
            raise IotgwError("--kafka-advertised-port needs a single broker", exit_code=2)
        if self.influx_version not in (1, 2):
            raise IotgwError("--influxdb must be 1 or 2", exit_code=2)
        unknown = set(self.kinds) - set(SERVER_KINDS)
        if unknown or not self.kinds:
            raise IotgwError(f"servers must be among {', '.join(SERVER_KINDS)}", exit_code=2)
        ports = [self.mqtt_port, self.secure_mqtt_port, self.influx_port, self.influx_port + 2]
        ports += [self.kafka_port + i for i in range(self.kafka_brokers)]
        if any(not 1024 <= port <= 65535 - CONTROLLER_PORT_OFFSET for port in ports):
            raise IotgwError("ports must be from 1024 to 65435", exit_code=2)

    @property
    def kafka_bootstrap(self) -> str:
        return ",".join(f"{HOST}:{self.kafka_port + i}" for i in range(self.kafka_brokers))

    @property
    def influx_url(self) -> str:
        return f"http://{HOST}:{self.influx_port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{HOST}:{self.mqtt_port}"

    @property
    def secure_mqtt_port(self) -> int:
        return self.mqtts_port or self.mqtt_port + SECURE_MQTT_PORT_OFFSET

    @property
    def certs(self) -> CertFiles:
        return CertFiles(self.root / "certs")

    @property
    def password_file(self) -> Path:
        """Mosquitto's password file: the gateway's and the devices' logins."""
        return self.root / "mosquitto" / "passwd"

    @property
    def gateway_password_file(self) -> Path:
        """The gateway user's password, readable by the stack's owner only."""
        return self.root / "mosquitto" / f"{GATEWAY_USER}.password"

    def secure_mqtt_url(self) -> str:
        """`IOTGW_MQTT_URL` for the gateway on the TLS listener, with its password."""
        try:
            password = self.gateway_password_file.read_text().strip()
        except OSError:
            raise IotgwError(
                f"no gateway password in {self.gateway_password_file}: run `iotgw stack up`"
            ) from None
        return f"mqtts://{GATEWAY_USER}:{password}@{HOST}:{self.secure_mqtt_port}"

    @property
    def influx_token_file(self) -> Path:
        """InfluxDB 2's operator token, readable by the stack's owner only."""
        return self.root / INFLUX2_FOLDER / "token"

    @property
    def influx_password_file(self) -> Path:
        """The password of InfluxDB 2's user, for its web UI; the owner's only."""
        return self.root / INFLUX2_FOLDER / "password"

    def influx_token(self) -> str:
        """The token InfluxDB 2's setup made; IotgwError when it has not run."""
        try:
            return self.influx_token_file.read_text().strip()
        except OSError:
            raise IotgwError(
                f"no InfluxDB 2 token in {self.influx_token_file}: run "
                "`iotgw stack up --influxdb 2`"
            ) from None


def influx_settings(plan: StackPlan, settings: Settings) -> Settings:
    """`settings` pointed at `plan`'s InfluxDB: on 2.x with its organisation, token and the
    bucket of `settings` (1.x's login dropped); on 1.x without any 2.x fields."""
    update: dict[str, object] = {"influx_url": plan.influx_url}
    if plan.influx_version == 2:
        update |= {
            "influx_org": INFLUX2_ORG, "influx_bucket": settings.influx_database,
            "influx_token": SecretStr(plan.influx_token()),
            "influx_username": None, "influx_password": None,
        }  # fmt: skip
    else:
        update |= {"influx_org": None, "influx_bucket": None, "influx_token": None}
    return settings.model_copy(update=update)


# InfluxDB 2.7 beside the default stack's 1.6.7 (which keeps 8086): what the tests and the
# benchmark that run against both versions use.
INFLUXDB2_BESIDE = StackPlan(
    DEFAULT_STACK_DIR / "tests-influxdb2", influx_port=8096, kinds=("influxdb",), influx_version=2
)


def new_cluster_id() -> str:
    """A random KRaft cluster id, as `kafka-storage random-uuid` makes them: never starting
    with '-', which the storage tool would take for an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class StackState:
    """What `stack up` recorded in `.stack/stack.json`, so `status` and `down` need no flags."""

    mqtt_port: int
    kafka_port: int
    kafka_brokers: int
    influx_port: int
    kinds: list[str]
    mqtts_port: int | None = None
    kafka_advertised_port: int | None = None
    kafka_cluster_id: str = field(default_factory=new_cluster_id)
    # Absent from the files of stacks made before InfluxDB 2 could run: those ran 1.x.
    influx_version: int = 1

    @classmethod
    def load(cls, root: Path) -> StackState | None:
        path = root / "stack.json"
        if not path.exists():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            raise IotgwError(f"{path} is damaged: stop the servers by hand and remove it") from None

    def save(self, root: Path) -> None:
        (root / "stack.json").write_text(json.dumps(asdict(self), indent=2) + "\n")

    def plan(self, root: Path) -> StackPlan:
        return StackPlan(
            root, self.mqtt_port, self.kafka_port, self.kafka_brokers, self.influx_port,
            tuple(self.kinds), self.mqtts_port, self.kafka_advertised_port, self.influx_version,
        )  # fmt: skip


class Server(ABC):
    """One server process of the stack: its config, command, files and readiness probe."""

    ready_timeout_s = 30.0
    # What `stack down` asks it to stop with (SIGKILL after STOP_TIMEOUT_S).
    stop_signal = signal.SIGTERM

    def __init__(self, plan: StackPlan, name: str, port: int) -> None:
        self.plan = plan
        self.name = name
        self.port = port

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def shown_address(self) -> str:
        """Where it listens, as `stack status` shows it."""
        return self.address

    @property
    def home(self) -> Path:
        return self.plan.root / self.name

    @property
    def config_file(self) -> Path:
        return self.home / self.config_name

    @property
    def pid_file(self) -> Path:
        return self.plan.root / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.plan.root / "logs" / f"{self.name}.log"

    def ports(self) -> list[int]:
        return [self.port]

    def render(self, template: str, **values: object) -> None:
        text = Template((LOCAL_TEMPLATES / template).read_text()).substitute(values)
        self.config_file.write_text(text)

    config_name: str

    @abstractmethod
    def prepare(self) -> None:
        """Write the config (and initialise storage) before the first start."""

    @abstractmethod
    def command(self) -> list[str]: ...

    @abstractmethod
    async def probe(self) -> bool:
        """True when the server really serves its protocol."""


class Mosquitto(Server):
    """Mosquitto with the plain development listener and the TLS listener with logins."""

    config_name = "mosquitto.conf"
    ready_timeout_s = 15.0

    def ports(self) -> list[int]:
        return [self.port, self.plan.secure_mqtt_port]

    @property
    def shown_address(self) -> str:
        return f"{self.address}, :{self.plan.secure_mqtt_port} (TLS)"

    def prepare(self) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        ensure_certificates(self.plan.certs.folder, LOCAL_HOSTNAMES)
        self._ensure_gateway_login()
        folders = {
            "data": self.home / "data", "auth": self.home,
            "certs": self.plan.certs.folder, "config": MOSQUITTO_ACL.parent,
        }  # fmt: skip
        self.config_file.write_text(
            local_mosquitto_config(
                MOSQUITTO_CONFIG, self.port, self.plan.secure_mqtt_port, getpass.getuser(),
                folders,
            )
        )  # fmt: skip

    def _ensure_gateway_login(self) -> None:
        """The gateway's password: made on the first start, kept after."""
        secret = self.plan.gateway_password_file
        passwords = PasswordFile(self.plan.password_file)
        if secret.exists() and passwords.check(GATEWAY_USER, secret.read_text().strip()):
            return
        password = generate_password()
        write_atomically(secret, f"{password}\n".encode())
        passwords.set(GATEWAY_USER, password)

    def command(self) -> list[str]:
        return ["mosquitto", "-c", str(self.config_file)]

    async def probe(self) -> bool:
        """Both listeners serve; the TLS one takes the gateway's login and verifies with ca.crt."""
        plain = MqttEndpoint(HOST, self.port, False, None, None)
        if not await broker_answers(plain, 2.0):
            return False
        password = SecretStr(self.plan.gateway_password_file.read_text().strip())
        secure = MqttEndpoint(HOST, self.plan.secure_mqtt_port, True, GATEWAY_USER, password)
        return await broker_answers(secure, 2.0, ca_file=self.plan.certs.ca_cert)


def local_mosquitto_config(
    source: Path, mqtt_port: int, mqtts_port: int, user: str, folders: dict[str, Path]
) -> str:
    """A mosquitto.conf written for the container's paths, moved to local ports and folders.

    The plain listener (1883) and the TLS listener (8883) move to the given ports on
    127.0.0.1, `/mosquitto/<folder>/...` paths to `folders[<folder>]`, `user` to the one
    who runs the stack. Anything else it cannot move is an error, never silently kept.
    """
    ports = {"1883": mqtt_port, "8883": mqtts_port}
    lines = []
    for line in source.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "listener":
            port = value.split()[0]
            if port not in ports:
                raise IotgwError(f"{source}: the local stack has no port for {line!r}")
            line = f"listener {ports[port]} {HOST}"
        elif key == "user":
            line = f"user {user}"
        elif value.startswith("/mosquitto/"):
            folder, _, rest = value.removeprefix("/mosquitto/").partition("/")
            if folder not in folders:
                raise IotgwError(f"{source}: the local stack has no folder for {line!r}")
            # Mosquitto wants the trailing slash of persistence_location kept.
            line = f"{key} {folders[folder] / rest}{'/' if value.endswith('/') else ''}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def reload_mosquitto(root: Path = DEFAULT_STACK_DIR) -> bool:
    """Make the stack's Mosquitto read its password file again (SIGHUP); False if not running."""
    for server in _recorded_servers(root):
        if isinstance(server, Mosquitto) and (pid := running_pid(server)) is not None:
            os.kill(pid, signal.SIGHUP)
            return True
    return False


class InfluxDB(Server):
    config_name = "influxdb.conf"

    def ports(self) -> list[int]:
        return [self.port, self.port + 2]

    def prepare(self) -> None:
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        self.render(
            "influxdb.conf",
            http_port=self.port, rpc_port=self.port + 2, data_dir=self.home / "data",
        )  # fmt: skip

    def command(self) -> list[str]:
        return ["influxd", "run", "-config", str(self.config_file)]

    async def probe(self) -> bool:
        async with InfluxClient(f"http://{self.address}", timeout_s=2.0) as influx:
            return await influx.ping()


class InfluxDB2(Server):
    """InfluxDB 2.x as `ensure_influxd2` built it, run on flags alone."""

    # 2.x takes no config file: its bolt file, which its command line names, is what tells
    # its process from another that took over a stale pid.
    config_name = "influxd.bolt"
    # influxd 2.x shuts down cleanly on SIGINT; SIGTERM ends it at once.
    stop_signal = signal.SIGINT

    def __init__(self, plan: StackPlan, binary: Path) -> None:
        super().__init__(plan, "influxdb", plan.influx_port)
        self.binary = binary

    @property
    def home(self) -> Path:
        return self.plan.root / INFLUX2_FOLDER

    def prepare(self) -> None:
        """Nothing to write: influxd makes its files on the first start, `set_up` the rest."""

    def command(self) -> list[str]:
        return [
            str(self.binary), "run", "--bolt-path", str(self.config_file),
            "--engine-path", str(self.home / "engine"),
            "--sqlite-path", str(self.home / "influxd.sqlite"),
            "--http-bind-address", self.address, "--reporting-disabled", "--log-level", "warn",
        ]  # fmt: skip

    async def probe(self) -> bool:
        """Ready when `/health` says pass."""
        async with httpx.AsyncClient(base_url=f"http://{self.address}", timeout=2.0) as http:
            try:
                response = await http.get("/health")
                return response.status_code == 200 and response.json().get("status") == "pass"
            except (httpx.HTTPError, ValueError):
                return False

    async def set_up(self, bucket: str, timeout_s: float, report: Report) -> None:
        """On the first start, make the organisation, `bucket`, the user and the token (the
        secrets saved, owner-only, before they are sent); later, find the token saved."""
        token_file = self.plan.influx_token_file
        async with httpx.AsyncClient(base_url=f"http://{self.address}", timeout=timeout_s) as http:
            try:
                if not (await http.get("/api/v2/setup")).json().get("allowed"):
                    if not token_file.exists():
                        raise IotgwError(
                            f"InfluxDB 2 in {self.home} is set up but its token file "
                            f"{token_file} is gone: stop the stack and delete {self.home} "
                            "to set it up afresh"
                        )
                    return
                token, password = generate_password(), generate_password()
                write_atomically(self.plan.influx_password_file, f"{password}\n".encode())
                write_atomically(token_file, f"{token}\n".encode())
                setup = {
                    "org": INFLUX2_ORG, "bucket": bucket, "username": INFLUX2_USER,
                    "password": password, "token": token,
                }  # fmt: skip
                response = await http.post("/api/v2/setup", json=setup)
            except (httpx.HTTPError, ValueError) as exc:
                raise IotgwError(
                    f"InfluxDB 2 at {self.address} did not answer its setup: {exc}"
                ) from None
        if not response.is_success:
            raise IotgwError(
                f"InfluxDB 2 refused its setup ({response.status_code}): {influx_reason(response)}"
            )
        report(
            f"set up InfluxDB 2: organisation {INFLUX2_ORG}, bucket {bucket}, user "
            f"{INFLUX2_USER}; token in {token_file}"
        )


class KafkaNode(Server):
    config_name = "server.properties"
    ready_timeout_s = 90.0

    def __init__(
        self, plan: StackPlan, node_id: int, kafka: KafkaDistribution, cluster_id: str
    ) -> None:
        super().__init__(plan, f"kafka-{node_id}", plan.kafka_port + node_id - 1)
        self.node_id = node_id
        self.kafka = kafka
        self.cluster_id = cluster_id

    @property
    def controller_port(self) -> int:
        return self.port + CONTROLLER_PORT_OFFSET

    def ports(self) -> list[int]:
        return [self.port, self.controller_port]

    def prepare(self) -> None:
        data = self.home / "data"
        data.mkdir(parents=True, exist_ok=True)
        brokers = self.plan.kafka_brokers
        voters = ",".join(
            f"{i}@{HOST}:{self.plan.kafka_port + i - 1 + CONTROLLER_PORT_OFFSET}"
            for i in range(1, brokers + 1)
        )
        replication = min(3, brokers)
        self.render(
            "kafka.properties",
            node_id=self.node_id, voters=voters, port=self.port,
            advertised_port=self.plan.kafka_advertised_port or self.port,
            controller_port=self.controller_port, data_dir=data,
            replication=replication, min_isr=2 if replication == 3 else 1,
        )  # fmt: skip
        if not (data / "meta.properties").exists():
            self._format_storage()

    def _format_storage(self) -> None:
        command = self._java("kafka.tools.StorageTool", "format", "-t", self.cluster_id,
                             "-c", str(self.config_file))  # fmt: skip
        with self.log_file.open("ab") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode:
            raise IotgwError(f"formatting storage of {self.name} failed; see {self.log_file}")

    def _java(self, main_class: str, *args: str) -> list[str]:
        return [
            "java", "-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOCAL_TEMPLATES / 'log4j2.yaml'}",
            "-cp", self.kafka.classpath, main_class, *args,
        ]  # fmt: skip

    def command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.config_file))

    async def probe(self) -> bool:
        """Ready when this node's metadata lists every broker of the cluster."""
        try:
            ids = await broker_ids(self.address, 3.0)
        except (IotgwError, KafkaError, TimeoutError):
            # Unreachable yet, or reachable while another node it names is not (a cluster
            # coming up answers "node not ready").
            return False
        return ids == list(range(1, self.plan.kafka_brokers + 1))


@dataclass(frozen=True)
class ServerStatus:
    name: str
    pid: int | None
    address: str
    up: bool


@dataclass(frozen=True)
class StackReport:
    """What `stack up` did and found."""

    servers: list[ServerStatus]
    started: list[str]
    kafka_version: str | None
    topics: list[TopicResult]
    seconds: float


def build_servers(
    plan: StackPlan,
    kafka: KafkaDistribution | None,
    cluster_id: str,
    influxd2: Path | None = None,
) -> list[Server]:
    """The plan's servers; `influxd2` is the binary InfluxDB 2 runs (version 2 only)."""
    servers: list[Server] = []
    if "mosquitto" in plan.kinds:
        servers.append(Mosquitto(plan, "mosquitto", plan.mqtt_port))
    if "kafka" in plan.kinds:
        if kafka is None:
            raise IotgwError("Kafka's jars are not resolved")
        servers += [KafkaNode(plan, i, kafka, cluster_id) for i in range(1, plan.kafka_brokers + 1)]
    if "influxdb" in plan.kinds and plan.influx_version == 2:
        if influxd2 is None:
            raise IotgwError("InfluxDB 2 is not built")
        servers.append(InfluxDB2(plan, influxd2))
    elif "influxdb" in plan.kinds:
        servers.append(InfluxDB(plan, "influxdb", plan.influx_port))
    return servers


def running_pid(server: Server) -> int | None:
    """The pid of this stack's process for `server`, or None.

    A pid file alone could name a process that died and whose pid was reused, so the
    process must also run this server's config file.
    """
    try:
        pid = int(server.pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(server.config_file).encode() in cmdline else None


# Handles of the processes this Python process started: kept so that they are reaped
# (no zombies while tests run) and never collected while their process still runs.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap() -> None:
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[pid]


# Open files a server may hold. A Kafka broker keeps several per partition (its log and
# index files), and a test run makes thousands of partitions (each test its own topics):
# Debian's default 20,000 ran out midway, refusing every connection ("Too many open
# files"). Kafka's docs ask for 100,000 or more.
_OPEN_FILES = 1 << 20


def _more_open_files() -> None:
    """In the child before it runs the server: as many open files as the system allows
    (the hard limit can be raised by root only; others get theirs)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (_OPEN_FILES, hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return


def _spawn(server: Server) -> subprocess.Popen[bytes]:
    with server.log_file.open("ab") as log:
        child = subprocess.Popen(
            server.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=server.home, start_new_session=True, preexec_fn=_more_open_files,
        )  # fmt: skip
    _CHILDREN[child.pid] = child
    server.pid_file.write_text(f"{child.pid}\n")
    return child


def _check_ports_free(server: Server) -> None:
    for port in server.ports():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
            except OSError:
                raise IotgwError(
                    f"port {port} for {server.name} is already in use by another process: "
                    "stop that process or start the stack on other ports"
                ) from None


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1][:200]
    return ""


async def _wait_ready(
    server: Server, child: subprocess.Popen[bytes] | None, timeout_s: float | None
) -> None:
    """Wait until `server` serves; `child` is its process when this call started it."""
    limit = timeout_s or server.ready_timeout_s
    deadline = time.monotonic() + limit
    while True:
        code = child.poll() if child is not None else None
        if code is not None or (child is None and running_pid(server) is None):
            raise IotgwError(
                f"{server.name} exited during start-up (code {code}); see {server.log_file}"
                f" (last line: {_last_line(server.log_file)})"
            )
        if await server.probe():
            return
        if time.monotonic() > deadline:
            raise IotgwError(
                f"{server.name} did not answer on {server.address} within {limit:.0f} s; "
                f"see {server.log_file}"
            )
        await asyncio.sleep(PROBE_INTERVAL_S)


@contextlib.contextmanager
def _quiet_clients() -> Iterator[None]:
    """Silence the MQTT and Kafka clients' logs while probes fail by design.

    A server that never comes up is reported in one line by `_wait_ready`.
    """
    loggers = [logging.getLogger(name) for name in ("aiokafka", "gmqtt")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _tcp_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _server_status(server: Server) -> ServerStatus:
    pid = running_pid(server)
    return ServerStatus(
        server.name, pid, server.shown_address, pid is not None and _tcp_open(server.address)
    )


def _recorded_servers(root: Path) -> list[Server]:
    state = StackState.load(root)
    if state is None:
        return []
    plan = state.plan(root)
    # Status and stop need names, files and ports only, not Kafka's jars nor influxd.
    kafka = KafkaDistribution("", root) if "kafka" in plan.kinds else None
    return build_servers(plan, kafka, state.kafka_cluster_id, Path("influxd"))


async def up(
    plan: StackPlan,
    settings: Settings,
    *,
    report: Report = _ignore,
    timeout_s: float | None = None,
) -> StackReport:
    """Install what is missing, start what is not running, wait until all serve, make topics."""
    started_at = time.monotonic()
    if not LOCAL_TEMPLATES.is_dir():
        raise IotgwError(
            f"{LOCAL_TEMPLATES} not found: `iotgw stack` runs from a checkout of iotgw"
        )
    for folder in ("run", "logs"):
        (plan.root / folder).mkdir(parents=True, exist_ok=True)
    install_log = plan.root / "logs" / "install.log"

    state = _reconcile_state(plan)
    influx = "influxdb" in plan.kinds
    binaries = ["mosquitto"] if "mosquitto" in plan.kinds else []
    binaries += ["influxd"] if influx and plan.influx_version == 1 else []
    ensure_debian_packages(binaries, install_log, report)
    influxd2 = ensure_influxd2(install_log, report) if influx and plan.influx_version == 2 else None
    if "mosquitto" in plan.kinds:
        _warn_of_backlog_bug(report)
    kafka = None
    if "kafka" in plan.kinds:
        ensure_java()
        kafka = ensure_kafka(LOCAL_TEMPLATES / "pom.xml", install_log, report)

    servers = build_servers(plan, kafka, state.kafka_cluster_id, influxd2)
    children: dict[str, subprocess.Popen[bytes]] = {}
    for server in servers:
        server.home.mkdir(parents=True, exist_ok=True)
        pid = running_pid(server)
        if pid is not None:
            report(f"{server.name} already running (pid {pid})")
            continue
        _check_ports_free(server)
        server.prepare()
        children[server.name] = child = _spawn(server)
        report(f"starting {server.name} on {server.address} (pid {child.pid})")
    state.save(plan.root)
    # Every server gets its whole chance to start; the first failure is reported after.
    waits = [_wait_ready(server, children.get(server.name), timeout_s) for server in servers]
    with _quiet_clients():
        outcomes = await asyncio.gather(*waits, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome

    topics: list[TopicResult] = []
    if "kafka" in plan.kinds:
        topics = await ensure_topics(
            settings.model_copy(update={"kafka_bootstrap": plan.kafka_bootstrap})
        )
    if influx:
        for server in servers:
            if isinstance(server, InfluxDB2):
                await server.set_up(settings.influx_database, settings.timeout_s, report)
        await setup_influx(influx_settings(plan, settings), report)
    return StackReport(
        [_server_status(server) for server in servers],
        list(children),
        kafka.version if kafka else None,
        topics,
        time.monotonic() - started_at,
    )


def mosquitto_version(
    binary: str = "mosquitto", env: dict[str, str] | None = None
) -> tuple[int, ...] | None:
    """The version `mosquitto -h` prints (e.g. (2, 0, 11)), or None if it prints none."""
    result = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10, env=env)
    match = re.search(r"mosquitto version (\d+)\.(\d+)\.(\d+)", result.stdout + result.stderr)
    return tuple(int(part) for part in match.groups()) if match else None


def _warn_of_backlog_bug(report: Report) -> None:
    """The local config needs per_listener_settings true (an anonymous development
    listener beside the secure one), which loses backlogs on newer Mosquittos."""
    version = mosquitto_version()
    if version is not None and version >= MOSQUITTO_BACKLOG_BUG_SINCE:
        shown = ".".join(map(str, version))
        report(
            f"warning: Mosquitto {shown} with per_listener_settings true (the local stack's "
            "two listeners) delivers none of an offline session's backlog (upstream #2618): "
            "readings published while the bridge is stopped are lost; Debian 12's 2.0.11 "
            "does not have this bug"
        )


def _reconcile_state(plan: StackPlan) -> StackState:
    """The state to record, refusing a change the running or stored servers cannot take."""
    state = StackState.load(plan.root)
    if state is not None:
        old = state.plan(plan.root)
        running = [s.name for s in _recorded_servers(plan.root) if running_pid(s)]
        if old.influx_version != plan.influx_version and "influxdb" in running:
            raise IotgwError(
                f"InfluxDB {old.influx_version} is running in {plan.root}: run "
                f"`iotgw stack down` before switching to --influxdb {plan.influx_version}"
            )
        if old != plan and running:
            raise IotgwError(
                f"a stack with other settings is running in {plan.root}: "
                "run `iotgw stack down` first"
            )
        kafka_data = any((plan.root / f"kafka-{i}" / "data").exists() for i in range(1, 10))
        if old.kafka_brokers != plan.kafka_brokers and "kafka" in plan.kinds and kafka_data:
            raise IotgwError(
                f"the Kafka data in {plan.root} belongs to a {old.kafka_brokers}-broker cluster: "
                "run `iotgw stack down --purge` to start afresh with "
                f"{plan.kafka_brokers} broker(s)"
            )
        return StackState(
            plan.mqtt_port, plan.kafka_port, plan.kafka_brokers, plan.influx_port,
            list(plan.kinds), plan.mqtts_port, plan.kafka_advertised_port,
            state.kafka_cluster_id, plan.influx_version,
        )  # fmt: skip
    return StackState(
        plan.mqtt_port, plan.kafka_port, plan.kafka_brokers, plan.influx_port, list(plan.kinds),
        plan.mqtts_port, plan.kafka_advertised_port, influx_version=plan.influx_version,
    )  # fmt: skip


def status(root: Path = DEFAULT_STACK_DIR) -> list[ServerStatus]:
    """The recorded servers and whether each runs and accepts connections."""
    _reap()
    return [_server_status(server) for server in _recorded_servers(root)]


def down(
    root: Path = DEFAULT_STACK_DIR,
    *,
    purge: bool = False,
    only: set[str] | None = None,
    report: Report = _ignore,
) -> list[str]:
    """Stop the processes this stack started (by their pid files), then optionally delete its data.

    `only` names the servers to stop (all when None).
    """
    servers = [s for s in _recorded_servers(root) if only is None or s.name in only]
    pids = {server.name: pid for server in servers if (pid := running_pid(server)) is not None}
    for server in servers:
        if server.name in pids:
            report(f"stopping {server.name} (pid {pids[server.name]})")
            # Data that is about to be deleted needs no clean shutdown.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[server.name], signal.SIGKILL if purge else server.stop_signal)
    _wait_gone(servers, STOP_TIMEOUT_S)
    for server in servers:
        pid = running_pid(server)
        if pid is not None:
            report(f"{server.name} did not stop within {STOP_TIMEOUT_S:.0f} s: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _wait_gone(servers, 10.0)
    for server in servers:
        server.pid_file.unlink(missing_ok=True)
    if purge and root.exists():
        report(f"deleting {root}")
        shutil.rmtree(root)
    return list(pids)


def _wait_gone(servers: list[Server], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap()
        if all(running_pid(server) is None for server in servers):
            return
        time.sleep(0.1)
