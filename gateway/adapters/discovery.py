"""Home Assistant discovery configs, read on a connection of their own (gmqtt, MQTT 5).

Configs are retained, and the bridge needs all of them before its ordered session
starts: a kept session delivers its queued state messages right after the CONNACK, and
each needs its entity's config to be read. This connection is clean (nothing to keep:
the broker holds every config), subscribes with retained messages sent, then publishes a
marker to a topic of its own: Mosquitto queues a subscription's retained messages before
it answers the SUBSCRIBE, so the marker comes back after the last of them. `start()`
returns then; config changes keep arriving as they happen.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from gmqtt import Client, Subscription

from gateway.adapters.mqtt import connect, publish_in_window
from gateway.errors import IotgwError
from gateway.settings import MqttEndpoint

__all__ = ["DiscoveryReader"]

log = structlog.get_logger(__name__)


class DiscoveryReader:
    """Calls `on_config(topic, payload)` for every discovery config, in the order read."""

    def __init__(
        self,
        endpoint: MqttEndpoint,
        filters: tuple[str, ...],
        on_config: Callable[[str, bytes], None],
        *,
        client_id: str,
        ca_file: Path | None,
        timeout_s: float,
    ) -> None:
        self._endpoint = endpoint
        self._filters = filters
        self._on_config = on_config
        self._ca_file = ca_file
        self._timeout_s = timeout_s
        self._marker = f"iotgw/discovery-sync/{client_id}/{uuid.uuid4().hex[:12]}"
        self._synced: asyncio.Future[None] | None = None
        self._client = Client(f"{client_id}-discovery"[:64], clean_session=True)
        self._client.on_message = self._message
        self.configs = 0

    async def start(self) -> None:
        """Connect, read every retained config; IotgwError if the broker does not answer."""
        self._synced = asyncio.get_running_loop().create_future()
        await connect(
            self._client,
            self._endpoint,
            ca_file=self._ca_file,
            timeout_s=self._timeout_s,
            keepalive=30,
        )
        self._client.subscribe(
            [Subscription(f, qos=1, retain_handling_options=0) for f in self._filters]
            + [Subscription(self._marker, qos=1)]
        )
        # The marker is sent once the SUBACK is in (gmqtt sends it after the SUBSCRIBE).
        await publish_in_window(self._client, self._marker, b"", qos=1)
        try:
            await asyncio.wait_for(asyncio.shield(self._synced), self._timeout_s)
        except TimeoutError:
            await self.stop()
            raise IotgwError(
                f"the MQTT broker at {self._endpoint.address} did not send the Home "
                f"Assistant discovery configs within {self._timeout_s:g} s"
            ) from None
        log.info("discovery_configs_read", configs=self.configs)

    def _message(self, client: Client, topic: str, payload: bytes, qos: int, props: Any) -> int:
        if topic == self._marker:
            if self._synced is not None and not self._synced.done():
                self._synced.set_result(None)
            return 0
        self.configs += 1
        self._on_config(topic, payload)
        return 0

    async def stop(self) -> None:
        if self._client.is_connected:
            await self._client.disconnect()
