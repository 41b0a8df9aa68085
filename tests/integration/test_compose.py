"""compose/docker-compose.yml, checked by a real Compose implementation (Debian's
docker-compose, which loads and validates a file without a Docker engine)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import stack
from devstack.installer import ensure_debian_packages
from gateway.adapters.mosquitto_auth import GATEWAY_USER
from gateway.settings import Settings, parse_mqtt_url

pytestmark = pytest.mark.integration

COMPOSE = stack.PROJECT_ROOT / "compose"
ENV_EXAMPLE = COMPOSE / ".env.example"
IOTGW_SERVICES = {
    "broker-init", "admin", "topics", "bridge", "writer", "rules", "state", "simulator",
}  # fmt: skip
ALL_SERVICES = IOTGW_SERVICES | {"mosquitto", "kafka", "kafka-2", "kafka-3", "influxdb", "grafana"}


@pytest.fixture(scope="module")
def compose_command(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    log = tmp_path_factory.mktemp("install") / "install.log"
    ensure_debian_packages(["docker-compose"], log, print)
    return ["docker-compose", "-f", str(COMPOSE / "docker-compose.yml")]


def config(command: list[str], *options: str, env_file: Path = ENV_EXAMPLE) -> dict[str, Any]:
    """The file as Compose loads it: validated, interpolated, anchors and merges resolved."""
    result = subprocess.run(
        [*command, "--env-file", str(env_file), *options, "config"],
        capture_output=True, text=True, timeout=60, cwd=COMPOSE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


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


def test_a_missing_password_stops_compose_with_its_name(
    compose_command: list[str], tmp_path: Path
) -> None:
    """.env.example documents every variable; leaving out a password is refused by name."""
    env_file = tmp_path / ".env"
    lines = ENV_EXAMPLE.read_text().splitlines()
    env_file.write_text(
        "\n".join(line for line in lines if not line.startswith("INFLUX_WRITER_PASSWORD="))
    )
    result = subprocess.run(
        [*compose_command, "--env-file", str(env_file), "config"],
        capture_output=True, text=True, timeout=60, cwd=COMPOSE,
    )  # fmt: skip
    assert result.returncode != 0
    assert "set INFLUX_WRITER_PASSWORD in compose/.env" in result.stderr


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
