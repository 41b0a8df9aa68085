"""The Compose deployment's Mosquitto config on Mosquitto 2.0.21 (bookworm-backports): a
bridge that was away gets every reading published meanwhile. The same broker with
per_listener_settings true delivers none of them (upstream #2618): the reason for the
setting, reproduced."""

from __future__ import annotations

import asyncio
import getpass
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import SecretStr

from devstack import stack
from gateway.adapters.certs import ensure_certificates
from gateway.adapters.mosquitto_auth import GATEWAY_USER, PasswordFile, generate_password
from gateway.adapters.mqtt import broker_answers
from gateway.settings import MqttEndpoint, Settings
from gateway.topics import Topics
from schemas import Device, DeviceType
from simulators.processes import free_ports
from tests.brokers import MosquittoBuild, backports_mosquitto
from tests.conftest import unique
from tests.support import (
    DevicePublisher,
    TopicReader,
    forget_session,
    own_settings,
    reading_payload,
    register,
    running_bridge,
    until,
)

pytestmark = pytest.mark.integration

BACKLOG = 1000


@pytest.fixture(scope="module")
def mosquitto_2_0_21(tmp_path_factory: pytest.TempPathFactory) -> MosquittoBuild:
    build = backports_mosquitto(tmp_path_factory.mktemp("fetch") / "apt.log")
    version = stack.mosquitto_version(str(build.binary), build.environment)
    assert version == (2, 0, 21), version
    return build


@contextmanager
def deployment_broker(
    build: MosquittoBuild, folder: Path, port: int, *, per_listener_settings: str
) -> Iterator[None]:
    """compose/mosquitto/mosquitto.conf moved to local folders and `port`, as the stack
    moves a config; only per_listener_settings may be changed, to show why it is false."""
    for name in ("data", "auth", "certs"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    folders = {
        "data": folder / "data", "auth": folder / "auth", "certs": folder / "certs",
        "config": stack.MOSQUITTO_ACL.parent,
    }  # fmt: skip
    text = stack.local_mosquitto_config(
        stack.COMPOSE_MOSQUITTO_CONFIG, port, port, getpass.getuser(), folders
    )
    assert "per_listener_settings false\n" in text
    if per_listener_settings == "true":
        # Per listener, the security settings must follow their `listener` line.
        listener = f"listener {port} {stack.HOST}\n"
        text = text.replace("per_listener_settings false", "per_listener_settings true")
        text = text.replace(listener, "").replace("allow_anonymous", listener + "allow_anonymous")
    config = folder / "mosquitto.conf"
    config.write_text(text)
    with (folder / "mosquitto.log").open("ab") as log:
        process = subprocess.Popen(
            [str(build.binary), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
            env=build.environment,
        )  # fmt: skip
    try:
        yield
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize(("per_listener_settings", "kept"), [("false", BACKLOG), ("true", 0)])
async def test_deployment_broker_keeps_an_offline_bridges_backlog(
    settings: Settings,
    mosquitto_2_0_21: MosquittoBuild,
    tmp_path: Path,
    per_listener_settings: str,
    kept: int,
) -> None:
    """Mosquitto 2.0.21 with the deployment's config: the bridge (TLS, the gateway's login)
    subscribes and stops; a device (TLS, its own login) publishes 1,000 readings; the
    bridge comes back and gets all 1,000 before a reading published after its return.
    With per_listener_settings true it gets none of the 1,000, only the later one."""
    port = free_ports(1)
    certs = ensure_certificates(tmp_path / "certs", stack.LOCAL_HOSTNAMES)
    gateway_password, device_password = generate_password(), generate_password()
    device_id = unique("dev")
    passwords = PasswordFile(tmp_path / "auth" / "passwd")
    passwords.set(GATEWAY_USER, gateway_password)
    passwords.set(device_id, device_password)
    with deployment_broker(
        mosquitto_2_0_21, tmp_path, port, per_listener_settings=per_listener_settings
    ):
        gateway = MqttEndpoint(stack.HOST, port, True, GATEWAY_USER, SecretStr(gateway_password))
        await until_answers(gateway, certs.ca_cert)
        s = await own_settings(
            settings,
            mqtt_url=SecretStr(f"mqtts://{GATEWAY_USER}:{gateway_password}@{stack.HOST}:{port}"),
            mqtt_ca_file=certs.ca_cert,
        )
        await register(s, Device(device_id=device_id, type=DeviceType.THERMOSTAT, registered_at=0))

        def device() -> DevicePublisher:
            login = (device_id, device_password)
            return DevicePublisher(stack.HOST, port, login=login, ca_file=certs.ca_cert)

        topic = f"devices/{device_id}/telemetry"
        try:
            async with running_bridge(s):
                pass  # the session and its subscription exist; the bridge is away now
            async with device() as offline:
                for seq in range(BACKLOG):
                    await offline.publish(topic, reading_payload(seq=seq))
            async with (
                TopicReader(s, Topics(s.topic_prefix).readings) as readings,
                running_bridge(s),
            ):
                async with device() as live:
                    await live.publish(topic, reading_payload(seq=BACKLOG))
                await until(
                    lambda: BACKLOG in [json.loads(r.value)["seq"] for r in readings.records],
                    30,
                    "the reading published after the bridge returned",
                )
        finally:
            await forget_session(s)
    seqs = [json.loads(r.value)["seq"] for r in readings.records]
    assert seqs == [*range(kept), BACKLOG]


async def until_answers(endpoint: MqttEndpoint, ca_file: Path) -> None:
    for _ in range(100):
        if await broker_answers(endpoint, 1.0, ca_file=ca_file):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"Mosquitto 2.0.21 did not answer on port {endpoint.port}")
