"""compose/docker-compose.yml, alone (InfluxDB 1.x) and with docker-compose.influxdb2.yml
(InfluxDB 2.7), checked by a real Compose implementation (Debian's docker-compose, which
loads, merges and validates files without a Docker engine)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import stack
from devstack.installer import ensure_debian_packages
from gateway.adapters.mosquitto_auth import GATEWAY_USER
from gateway.domain.rollups import influxql_duration, rollup_bucket
from gateway.settings import Settings, parse_mqtt_url

pytestmark = pytest.mark.integration

COMPOSE = stack.PROJECT_ROOT / "compose"
ENV_EXAMPLE = COMPOSE / ".env.example"
# The files of each deployment, in the order Compose merges them.
DEPLOYMENTS = {
    "influxdb1": ["docker-compose.yml"],
    "influxdb2": ["docker-compose.yml", "docker-compose.influxdb2.yml"],
}
IOTGW_SERVICES = {
    "broker-init", "admin", "influx-setup", "topics", "bridge", "writer", "rules", "state",
    "simulator",
}  # fmt: skip
ALL_SERVICES = IOTGW_SERVICES | {"mosquitto", "kafka", "kafka-2", "kafka-3", "influxdb", "grafana"}


@pytest.fixture(scope="module")
def docker_compose(tmp_path_factory: pytest.TempPathFactory) -> str:
    log = tmp_path_factory.mktemp("install") / "install.log"
    ensure_debian_packages(["docker-compose"], log, print)
    return "docker-compose"


def deployment(docker_compose: str, name: str) -> list[str]:
    """The Compose command of a deployment: its files named in order."""
    return [
        docker_compose,
        *(arg for file in DEPLOYMENTS[name] for arg in ("-f", str(COMPOSE / file))),
    ]


@pytest.fixture(scope="module", params=list(DEPLOYMENTS))
def compose_command(request: pytest.FixtureRequest, docker_compose: str) -> list[str]:
    """Each deployment in turn: what holds for one holds for both."""
    return deployment(docker_compose, request.param)


@pytest.fixture(scope="module")
def influxdb2_command(docker_compose: str) -> list[str]:
    return deployment(docker_compose, "influxdb2")


def config(command: list[str], *options: str, env_file: Path = ENV_EXAMPLE) -> dict[str, Any]:
    """The file as Compose loads it: validated, interpolated, anchors and merges resolved."""
    result = subprocess.run(
        [*command, "--env-file", str(env_file), *options, "config"],
        capture_output=True, text=True, timeout=60, cwd=COMPOSE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


def env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """The variables an env file sets."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def service_settings(service: dict[str, Any]) -> Settings:
    """The settings an iotgw service starts with, from the environment Compose gives it."""
    fields = {name.removeprefix("IOTGW_").lower(): value
              for name, value in service["environment"].items()}  # fmt: skip
    return Settings(**fields)


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("/"):
            mounts[target] = Path(source)
    return mounts


def test_compose_file_loads_with_every_profile(compose_command: list[str]) -> None:
    """Every service is defined; what a service depends on is defined too, with and without
    the optional profiles; every file it mounts and every build context exists."""
    loaded = config(compose_command, "--profile", "demo", "--profile", "kafka-cluster")
    services = loaded["services"]
    assert set(services) == ALL_SERVICES
    optional = {name: s["profiles"] for name, s in services.items() if "profiles" in s}
    assert optional == {"simulator": ["demo"], "kafka-2": ["kafka-cluster"],
                        "kafka-3": ["kafka-cluster"], "admin": ["admin"]}  # fmt: skip
    for name, service in services.items():
        needed = set(service.get("depends_on", {}))
        assert needed <= set(services), name
        if name not in optional:
            assert not needed & set(optional), f"{name} needs a service of an optional profile"
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}: it does not exist"
        if "build" in service:
            context = Path(service["build"]["context"])
            assert (context / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("/") or source in loaded["volumes"], (name, source)


def test_mosquitto_runs_the_deployment_config_and_the_stacks_acl(
    compose_command: list[str],
) -> None:
    """The broker mounts compose/mosquitto/mosquitto.conf (tested on Mosquitto 2.0.21 by
    test_broker_config.py) and the ACL the local-stack tests run; every path the config
    names lies in something the deployment mounts."""
    mosquitto = config(compose_command)["services"]["mosquitto"]
    mounts = bind_mounts(mosquitto)
    assert mounts["/mosquitto/config/mosquitto.conf"] == stack.COMPOSE_MOSQUITTO_CONFIG
    assert mounts["/mosquitto/config/acl"] == stack.MOSQUITTO_ACL
    targets = [volume.split(":")[1] for volume in mosquitto["volumes"]]
    text = stack.COMPOSE_MOSQUITTO_CONFIG.read_text()
    for path in re.findall(r"^\w+ (/mosquitto/\S+)$", text, flags=re.MULTILINE):
        assert any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets), path


def test_only_secure_mqtt_and_grafana_are_published(compose_command: list[str]) -> None:
    loaded = config(compose_command, "--profile", "demo", "--profile", "kafka-cluster")
    published = {
        (name, port["target"])
        for name, service in loaded["services"].items()
        for port in service.get("ports", [])
    }
    assert published == {("mosquitto", 8883), ("grafana", 3000)}


def test_services_read_the_sources_and_types_files_shipped_with_compose(
    compose_command: list[str],
) -> None:
    """The bridge, writer, rules engine and admin read compose/iotgw/sources.yaml and
    types.yaml (mounted read-only); the shipped files are valid: the envelope only, the
    built-in types."""
    services = config(compose_command, "--profile", "admin")["services"]
    for name in ("bridge", "writer", "rules", "admin"):
        environment = services[name]["environment"]
        # Debian's docker-compose prints the short form, source:target[:mode].
        mounts = {v.split(":")[1]: v.split(":")[2:] for v in services[name]["volumes"]}
        for variable, target in (
            ("IOTGW_SOURCES_FILE", "/etc/iotgw/sources.yaml"),
            ("IOTGW_TYPES_FILE", "/etc/iotgw/types.yaml"),
        ):
            assert environment[variable] == target
            assert mounts[target] == ["ro"], (name, target)
    settings = Settings(
        sources_file=COMPOSE / "iotgw" / "sources.yaml", types_file=COMPOSE / "iotgw" / "types.yaml"
    )
    assert not settings.sources()
    assert settings.catalogue().user_types == []


def test_iotgw_services_log_in_on_tls_and_one_bridge_keeps_the_order(
    compose_command: list[str],
) -> None:
    """Every iotgw service reaches the broker over TLS as the gateway, verifying it with
    the CA; one bridge with a fixed client id on a plain subscription (worker processes,
    not a share group, scale it); restarts are automatic with health checks."""
    services = config(compose_command, "--profile", "demo")["services"]
    for name in IOTGW_SERVICES:
        environment = services[name]["environment"]
        endpoint = parse_mqtt_url(environment["IOTGW_MQTT_URL"])
        assert (endpoint.tls, endpoint.host, endpoint.username) == (True, "mosquitto", GATEWAY_USER)
        assert environment["IOTGW_MQTT_CA_FILE"] == "/var/lib/iotgw/certs/ca.crt"
    bridge = services["bridge"]["environment"]
    assert bridge["IOTGW_MQTT_CLIENT_ID"] == "iotgw-bridge-1"
    assert "IOTGW_MQTT_SHARE_GROUP" not in bridge
    assert int(bridge["IOTGW_BRIDGE_WORKERS"]) >= 1
    assert not [name for name in services if name.startswith("bridge-")]
    for name in ("bridge", "writer", "rules", "state", "mosquitto", "kafka", "influxdb"):
        assert services[name]["restart"] == "unless-stopped"
        assert "healthcheck" in services[name], name


def refusal_without(command: list[str], variable: str, folder: Path) -> str:
    """What Compose says of .env.example without `variable` (it must refuse)."""
    env = folder / ".env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env.write_text("\n".join(line for line in lines if not line.startswith(f"{variable}=")))
    result = subprocess.run(
        [*command, "--env-file", str(env), "config"],
        capture_output=True, text=True, timeout=60, cwd=COMPOSE,
    )  # fmt: skip
    assert result.returncode != 0
    return result.stderr


def test_a_missing_password_stops_compose_with_its_name(
    compose_command: list[str], tmp_path: Path
) -> None:
    """.env.example documents every variable; leaving out a password is refused by name."""
    refusal = refusal_without(compose_command, "INFLUX_WRITER_PASSWORD", tmp_path)
    assert "set INFLUX_WRITER_PASSWORD in compose/.env" in refusal


def test_dockerfile_installs_from_the_lock_and_runs_as_non_root() -> None:
    """Multi-stage, dependencies from uv.lock (frozen, no dev tools), files it copies exist,
    a non-root user, `iotgw` as entry point."""
    lines = [
        line.strip()
        for line in (stack.PROJECT_ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sum(line.startswith("FROM ") for line in lines) == 2
    syncs = [line for line in lines if "uv sync" in line]
    assert syncs
    assert all("--frozen" in line and "--no-dev" in line for line in syncs)
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (stack.PROJECT_ROOT / source).exists(), line
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    assert lines[-2:] == ['ENTRYPOINT ["iotgw"]', 'CMD ["--help"]']


def test_secrets_are_mounted_only_where_needed(compose_command: list[str]) -> None:
    """The CA's key is in broker-init alone; device logins are changed by broker-init and
    the admin service alone (the broker reads them); the services see certificates only."""
    services = config(compose_command, "--profile", "demo", "--profile", "admin")["services"]

    def mounting(volume: str) -> dict[str, str]:
        found = {}
        for name, service in services.items():
            for entry in service.get("volumes", []):
                source, _, rest = entry.partition(":")
                if source == volume:
                    found[name] = "ro" if rest.endswith(":ro") else "rw"
        return found

    assert mounting("ca-key") == {"broker-init": "rw"}
    assert mounting("mosquitto-auth") == {"broker-init": "rw", "admin": "rw", "mosquitto": "ro"}
    assert set(mounting("certs").values()) == {"ro", "rw"}
    assert {n for n, mode in mounting("certs").items() if mode == "rw"} == {"broker-init"}


def test_influx_setup_runs_before_the_writer_and_grafana(compose_command: list[str]) -> None:
    """`iotgw influx setup` runs once per start when InfluxDB is healthy, with a login that
    may set retention and rollups (1.x: the admin; 2.x: the admin token); the writer and
    Grafana wait until it succeeded."""
    services = config(compose_command)["services"]
    setup = services["influx-setup"]
    assert setup["command"] == ["influx", "setup"]
    assert setup["restart"] == "no"
    assert setup["depends_on"] == {"influxdb": {"condition": "service_healthy"}}
    for name in ("writer", "grafana"):
        assert services[name]["depends_on"]["influx-setup"] == {
            "condition": "service_completed_successfully"
        }
    env = env_file()
    settings = service_settings(setup)
    if settings.influx_token is not None:
        assert settings.influx_token.get_secret_value() == env["INFLUX_ADMIN_TOKEN"]
        assert settings.influx_auth is None
    else:
        assert settings.influx_auth == (env["INFLUX_ADMIN_USER"], env["INFLUX_ADMIN_PASSWORD"])


def test_the_device_dashboard_reads_rollups_beyond_the_deployments_raw_retention(
    compose_command: list[str],
) -> None:
    """The retention the shipped .env sets is the device dashboard's `raw_retention`, past
    which it reads the hourly rollups; the rollups are kept longer."""
    settings = service_settings(config(compose_command)["services"]["influx-setup"])
    dashboard = json.loads((COMPOSE / "grafana/dashboards/device-detail.json").read_text())
    [raw_retention] = [
        v["query"] for v in dashboard["templating"]["list"] if v["name"] == "raw_retention"
    ]
    assert influxql_duration(settings.influx_retention) == raw_retention
    assert settings.influx_rollup_retention > settings.influx_retention


def test_influxdb2_sets_itself_up_with_the_env_files_org_and_token(
    influxdb2_command: list[str],
) -> None:
    """With the 2.x file InfluxDB is the official 2.7 image, set up at its first start with
    the .env's organisation and admin token and bucket iot, its data and configuration in
    volumes; every iotgw service writes to bucket iot with that token, without 1.x's login."""
    loaded = config(influxdb2_command, "--profile", "demo", "--profile", "admin")
    influxdb = loaded["services"]["influxdb"]
    env = env_file()
    assert influxdb["image"] == "influxdb:2.7"
    init = {k: v for k, v in influxdb["environment"].items() if k.startswith("DOCKER_INFLUXDB_")}
    assert init == {
        "DOCKER_INFLUXDB_INIT_MODE": "setup",
        "DOCKER_INFLUXDB_INIT_ORG": env["INFLUX_ORG"],
        "DOCKER_INFLUXDB_INIT_BUCKET": "iot",
        "DOCKER_INFLUXDB_INIT_USERNAME": env["INFLUX_ADMIN_USER"],
        "DOCKER_INFLUXDB_INIT_PASSWORD": env["INFLUX_ADMIN_PASSWORD"],
        "DOCKER_INFLUXDB_INIT_ADMIN_TOKEN": env["INFLUX_ADMIN_TOKEN"],
    }
    volumes = {v.split(":")[1]: v.split(":")[0] for v in influxdb["volumes"]}
    assert volumes["/var/lib/influxdb2"] in loaded["volumes"]
    assert volumes["/etc/influxdb2"] in loaded["volumes"]
    assert influxdb["healthcheck"]["test"][-1] == "http://127.0.0.1:8086/health"
    for name in IOTGW_SERVICES:
        settings = service_settings(loaded["services"][name])
        assert settings.influx_token is not None, name
        assert settings.influx_token.get_secret_value() == env["INFLUX_ADMIN_TOKEN"]
        assert (settings.influx_org, settings.influx_database) == (env["INFLUX_ORG"], "iot")
        assert settings.influx_auth is None, name


def test_grafana_reads_influxdb2_with_its_read_only_login(influxdb2_command: list[str]) -> None:
    """Grafana's datasource (the same file as on 1.x) logs in as the .env's reader, whom
    InfluxDB's first start makes a v1 login that may read bucket iot and its rollup bucket,
    nothing else."""
    services = config(influxdb2_command)["services"]
    influxdb, grafana = services["influxdb"], services["grafana"]
    for variable in ("INFLUX_READER_USER", "INFLUX_READER_PASSWORD"):
        assert influxdb["environment"][variable] == grafana["environment"][variable]
    provisioned = yaml.safe_load(
        (COMPOSE / "grafana/provisioning/datasources/influxdb.yaml").read_text()
    )
    [datasource] = provisioned["datasources"]
    assert datasource["user"] == "${INFLUX_READER_USER}"
    assert datasource["secureJsonData"] == {"password": "${INFLUX_READER_PASSWORD}"}
    assert (
        datasource["jsonData"]["dbName"] == influxdb["environment"]["DOCKER_INFLUXDB_INIT_BUCKET"]
    )
    # The image runs the executable *.sh files of /docker-entrypoint-initdb.d once.
    script = bind_mounts(influxdb)["/docker-entrypoint-initdb.d/grafana-reader.sh"]
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], timeout=10).returncode == 0
    # The login may read two buckets, the second the rollups' as iotgw names it, and write none.
    text = script.read_text()
    assert f'"{rollup_bucket("${DOCKER_INFLUXDB_INIT_BUCKET}")}"' in text
    assert text.count("--read-bucket") == 2
    assert "--write-bucket" not in text


def test_a_missing_admin_token_stops_the_influxdb2_deployment_with_its_name(
    influxdb2_command: list[str], tmp_path: Path
) -> None:
    """.env.example documents InfluxDB 2's admin token; leaving it out is refused by name."""
    refusal = refusal_without(influxdb2_command, "INFLUX_ADMIN_TOKEN", tmp_path)
    assert "set INFLUX_ADMIN_TOKEN in compose/.env" in refusal
