"""MQTT connections to the broker (gmqtt, MQTT 5)."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from pathlib import Path
from typing import Any

from gmqtt import Client
from gmqtt.mqtt.handler import MQTTConnectError

from gateway.errors import IotgwError
from gateway.settings import MqttEndpoint

__all__ = ["broker_answers", "connect", "publish_in_window", "tls_context", "unreachable"]


async def publish_in_window(
    client: Client, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False
) -> None:
    """Publish once the broker's in-flight window has room.

    gmqtt raises OverflowError while every packet id awaits its PUBACK (the broker's
    receive maximum); waiting for a PUBACK is the flow control a QoS 1 sender needs.
    """
    while True:
        try:
            client.publish(topic, payload, qos=qos, retain=retain)
            return
        except OverflowError:
            await asyncio.sleep(0.001)


def tls_context(endpoint: MqttEndpoint, ca_file: Path | None) -> ssl.SSLContext | bool:
    """No TLS for mqtt://; for mqtts:// a context that verifies the broker's certificate and
    name against `ca_file` (the system's CAs when None)."""
    if not endpoint.tls:
        return False
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise IotgwError(f"cannot use the CA file {ca_file}: {exc}") from None


async def connect(
    client: Client,
    endpoint: MqttEndpoint,
    *,
    ca_file: Path | None,
    timeout_s: float,
    **options: Any,
) -> None:
    """Log in and connect `client`; IotgwError with the reason (never the password) if not."""
    if endpoint.username:
        password = endpoint.password.get_secret_value() if endpoint.password else None
        client.set_auth_credentials(endpoint.username, password)
    where = endpoint.address
    try:
        await asyncio.wait_for(
            client.connect(
                endpoint.host, endpoint.port, ssl=tls_context(endpoint, ca_file), **options
            ),
            timeout_s,
        )
    except MQTTConnectError as exc:
        raise IotgwError(f"the MQTT broker at {where} refused the connection: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise unreachable(endpoint, exc) from None


def unreachable(endpoint: MqttEndpoint, exc: OSError | TimeoutError) -> IotgwError:
    """The one-line error for a broker that could not be reached, or whose TLS failed."""
    if isinstance(exc, ssl.SSLError):
        return IotgwError(f"TLS with the MQTT broker at {endpoint.address} failed: "
                          f"{exc.reason or exc}")  # fmt: skip
    return IotgwError(f"MQTT broker unreachable at {endpoint.address}: {exc or 'timed out'}")


async def broker_answers(
    endpoint: MqttEndpoint, timeout_s: float, *, ca_file: Path | None = None
) -> bool:
    """True when the broker accepts an MQTT 5 connect (CONNACK success) within `timeout_s`."""
    client = Client(f"iotgw-probe-{uuid.uuid4().hex[:12]}")
    # A probe tries once; gmqtt would otherwise keep reconnecting in the background.
    client.set_config({"reconnect_retries": 0})
    try:
        await connect(client, endpoint, ca_file=ca_file, timeout_s=timeout_s, keepalive=10)
    except IotgwError:
        return False
    await client.disconnect()
    return True
