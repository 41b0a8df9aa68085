"""MQTT connections to the broker (gmqtt, MQTT 5)."""

from __future__ import annotations

import asyncio
import uuid

from gmqtt import Client
from gmqtt.mqtt.handler import MQTTConnectError

from gateway.settings import MqttEndpoint


async def publish_in_window(client: Client, topic: str, payload: bytes, qos: int = 1) -> None:
    """Publish once the broker's in-flight window has room.

    gmqtt raises OverflowError while every packet id awaits its PUBACK (the broker's
    receive maximum); waiting for a PUBACK is the flow control a QoS 1 sender needs.
    """
    while True:
        try:
            client.publish(topic, payload, qos=qos)
            return
        except OverflowError:
            await asyncio.sleep(0.001)


async def broker_answers(endpoint: MqttEndpoint, timeout_s: float) -> bool:
    """True when the broker accepts an MQTT 5 connect (CONNACK success) within `timeout_s`."""
    client = Client(f"iotgw-probe-{uuid.uuid4().hex[:12]}")
    # A probe tries once; gmqtt would otherwise keep reconnecting in the background.
    client.set_config({"reconnect_retries": 0})
    if endpoint.username:
        password = endpoint.password.get_secret_value() if endpoint.password else None
        client.set_auth_credentials(endpoint.username, password)
    try:
        await asyncio.wait_for(
            client.connect(endpoint.host, endpoint.port, ssl=endpoint.tls, keepalive=10),
            timeout_s,
        )
    except (OSError, TimeoutError, MQTTConnectError):
        return False
    await client.disconnect()
    return True
