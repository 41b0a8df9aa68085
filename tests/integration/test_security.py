"""The secure listener (TLS, a login per device, a per-device ACL) of the local stack, used
as a device and an operator would: credentials from `iotgw devices ... --credentials`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from gmqtt import Client
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from devstack import stack
from gateway.adapters.mqtt import connect
from gateway.errors import IotgwError
from gateway.settings import Settings, parse_mqtt_url
from gateway.topics import Topics
from simulators.processes import ServiceProcess
from tests.conftest import unique
from tests.support import (
    TopicReader,
    forget_session,
    own_settings,
    reading_payload,
    running_bridge,
    until,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


async def iotgw(env: dict[str, str], *args: str) -> Finished:
    """`iotgw ARGS` as an operator runs it, with `env` added to the environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return Finished(process.returncode, stdout.decode(), stderr.decode())


async def cli(settings: Settings, *args: str) -> Finished:
    """`iotgw ARGS` on this test's topics."""
    env = {
        "IOTGW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "IOTGW_TOPIC_PREFIX": settings.topic_prefix,
    }
    return await iotgw(env, *args)


async def register_with_credentials(settings: Settings, device_id: str) -> str:
    result = await cli(settings, "devices", "register", device_id, "--type", "thermostat",
                       "--credentials", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"device_id", "password"}
    assert answer["device_id"] == device_id
    return str(answer["password"])


class Device:
    """A device on the secure listener (paho-mqtt, MQTT 5), as firmware would connect."""

    def __init__(self, plan: stack.StackPlan, user: str | None, password: str | None) -> None:
        self.plan = plan
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=unique("dev"), protocol=mqtt.MQTTv5
        )
        self.client.tls_set(ca_certs=str(plan.certs.ca_cert))
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(60, 60)
        self.connack: ReasonCode | None = None
        self.disconnected: ReasonCode | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def _on_connect(self, *args: Any) -> None:
        self.connack = args[3]

    def _on_disconnect(self, *args: Any) -> None:
        self.disconnected = args[3]

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: ReasonCode, _: Any) -> None:
        self.pubacks[mid] = rc

    async def connect(self) -> ReasonCode:
        """Connect (TLS handshake included) and return the broker's CONNACK reason."""
        await asyncio.to_thread(self.client.connect, stack.HOST, self.plan.secure_mqtt_port)
        self.client.loop_start()
        await until(lambda: self.connack is not None, 10, "CONNACK")
        assert self.connack is not None
        return self.connack

    async def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish QoS 1 and return the reason code of the broker's PUBACK."""
        mid = self.client.publish(topic, payload, qos=1).mid
        await until(lambda: mid in self.pubacks, 10, "PUBACK")
        return self.pubacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@asynccontextmanager
async def secure_bridge(settings: Settings, plan: stack.StackPlan) -> AsyncIterator[Settings]:
    """A bridge that logs in to the secure listener as the gateway and verifies the broker."""
    secure = settings.model_copy(
        update={"mqtt_url": SecretStr(plan.secure_mqtt_url()), "mqtt_ca_file": plan.certs.ca_cert}
    )
    try:
        async with running_bridge(secure):
            yield secure
    finally:
        await forget_session(secure)


async def test_a_device_publishes_only_as_itself_on_the_secure_listener(
    settings: Settings, local_stack: stack.StackPlan
) -> None:
    """With its credentials a device's reading reaches iot.readings through a bridge on TLS;
    its reading on another device's topic is refused ("Not authorized") and reaches nothing."""
    own = await own_settings(settings)
    me, other = unique("sec"), unique("sec")
    password = await register_with_credentials(own, me)
    await register_with_credentials(own, other)
    topics = Topics(own.topic_prefix)
    async with (
        secure_bridge(own, local_stack) as secure,
        TopicReader(secure, topics.readings) as readings,
        TopicReader(secure, topics.dead_letters) as dead_letters,
    ):
        device = Device(local_stack, me, password)
        assert (await device.connect()).value == 0
        try:
            refused = await device.publish(f"devices/{other}/telemetry", reading_payload(seq=1))
            # The next reading follows the refused one on the same connection: once it has
            # arrived, the refused one would have too.
            accepted = await device.publish(f"devices/{me}/telemetry", reading_payload(seq=2))
        finally:
            device.close()
        assert refused.getName() == "Not authorized"
        assert accepted.value == 0
        await readings.wait_for(1)
    assert [(r.key.decode(), json.loads(r.value)["seq"]) for r in readings.records] == [(me, 2)]
    assert dead_letters.records == []


@pytest.mark.parametrize("login", ["wrong password", "no password"])
async def test_the_secure_listener_refuses_bad_logins(
    settings: Settings, local_stack: stack.StackPlan, login: str
) -> None:
    """A wrong password and no login at all are refused at CONNACK."""
    own = await own_settings(settings)
    device_id = unique("sec")
    password = await register_with_credentials(own, device_id)
    user, secret = (device_id, password + "x") if login == "wrong password" else (None, None)
    device = Device(local_stack, user, secret)
    try:
        assert (await device.connect()).is_failure
    finally:
        device.close()


async def test_a_client_that_does_not_trust_the_stack_ca_is_refused(
    settings: Settings, local_stack: stack.StackPlan
) -> None:
    """A client with the right password that checks the broker against the system's CAs
    only (not the stack's ca.crt) fails the TLS handshake: one line, no traceback."""
    own = await own_settings(settings)
    device_id = unique("sec")
    password = await register_with_credentials(own, device_id)
    url = f"mqtts://{device_id}:{password}@{stack.HOST}:{local_stack.secure_mqtt_port}"
    with pytest.raises(IotgwError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await connect(Client(unique("dev")), parse_mqtt_url(url), ca_file=None, timeout_s=10)


async def test_disabling_a_device_revokes_its_login(
    settings: Settings, local_stack: stack.StackPlan
) -> None:
    """`iotgw devices disable` drops the device's live connection and refuses its next login."""
    own = await own_settings(settings)
    device_id = unique("sec")
    password = await register_with_credentials(own, device_id)
    connected = Device(local_stack, device_id, password)
    assert (await connected.connect()).value == 0
    try:
        result = await cli(own, "devices", "disable", device_id)
        assert result.returncode == 0, result.stderr
        assert f"revoked the MQTT login of {device_id}" in result.stdout
        await until(lambda: connected.disconnected is not None, 10, "disconnect")
    finally:
        connected.close()
    again = Device(local_stack, device_id, password)
    try:
        assert (await again.connect()).is_failure
    finally:
        again.close()
    assert device_id not in local_stack.password_file.read_text()


async def test_secrets_never_reach_logs_or_errors(
    settings: Settings, local_stack: stack.StackPlan, tmp_path: Path
) -> None:
    """`iotgw run all` with the gateway's MQTT password and an InfluxDB password set, and
    commands that fail on wrong or invalid secrets, print none of them."""
    own = await own_settings(settings)
    gateway_password = local_stack.gateway_password_file.read_text().strip()
    device_password = await register_with_credentials(own, unique("sec"))
    influx_password, kafka_password = unique("influx-secret"), unique("kafka-secret")
    secrets = [gateway_password, device_password, influx_password, kafka_password]
    secure = own.model_copy(
        update={
            "mqtt_url": SecretStr(local_stack.secure_mqtt_url()),
            "mqtt_ca_file": local_stack.certs.ca_cert,
            "mqtt_session_expiry_s": 0,
            "rules_group": unique("rules"),
            "rules_instance_id": unique("rules"),
            "influx_username": "writer",
            "influx_password": SecretStr(influx_password),
        }
    )
    env = secure.environment()
    log = tmp_path / "run-all.log"
    services = ServiceProcess("all", secure, log).start()
    try:
        await services.ready()
    finally:
        assert await asyncio.to_thread(services.stop, 20) == 0
    listener = f"127.0.0.1:{local_stack.secure_mqtt_port}"
    failing = [
        # Another login's password as the gateway's: refused by the broker.
        {"IOTGW_MQTT_URL": f"mqtts://iotgw:{device_password}@{listener}"},
        # SASL that the local Kafka does not speak.
        {"IOTGW_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "IOTGW_KAFKA_USERNAME": "gw",
         "IOTGW_KAFKA_PASSWORD": kafka_password, "IOTGW_TIMEOUT_S": "3"},
        # An invalid URL that carries a password, and an invalid setting beside it.
        {"IOTGW_MQTT_URL": f"mqtts://iotgw:{gateway_password}@{listener}x",
         "IOTGW_READINGS_PARTITIONS": "0"},
    ]  # fmt: skip
    outputs = [log.read_text()]
    for extra in failing:
        result = await iotgw({**env, **extra}, "run", "bridge")
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        outputs.append(result.stdout + result.stderr)
    status = await iotgw(env, "stack", "up")
    assert status.returncode == 0, status.stderr
    outputs.append(status.stdout + status.stderr)
    for output in outputs:
        for secret in secrets:
            assert secret not in output
