"""Home Assistant discovery configs, read on a connection of their own (gmqtt, MQTT 5).

Configs are retained, and the bridge needs all of them before its ordered session
starts: a kept session delivers its queued state messages right after the CONNACK, and
each needs its entity's config to be read. This connection is clean (nothing to keep:
the broker holds every config), subscribes with retained messages sent, then publishes a
marker to a topic of its own: Mosquitto queues a subscription's retained messages before
it answers the SUBSCRIBE, so the marker comes back after the last of them. `start()`
returns then; config changes keep arriving as they happen. gmqtt reconnects by itself but
does not subscribe again: on each reconnect this reader subscribes and syncs again, and a
config that was known and did not come again was removed meanwhile.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from gmqtt import Client, Subscription

from gateway.adapters.mqtt import connect
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
        self._markers = f"iotgw/discovery-sync/{client_id}"
        self._marker = self._new_marker()
        self._synced: asyncio.Future[None] | None = None
        # Config topics that hold a config; during a sync after a reconnect, those seen.
        self._known: set[str] = set()
        self._seen: set[str] | None = None
        self._client = Client(f"{client_id}-discovery"[:64], clean_session=True)
        self._client.on_message = self._message
        self._client.on_connect = self._connected
        self.configs = 0

    def _new_marker(self) -> str:
        return f"{self._markers}/{uuid.uuid4().hex[:12]}"

    def _subscribe_and_mark(self) -> None:
        """Subscribe (retained configs sent), then the marker that comes back after them."""
        self._client.subscribe(
            [Subscription(f, qos=1, retain_handling_options=0) for f in self._filters]
            + [Subscription(self._marker, qos=1)]
        )
        self._client.publish(self._marker, b"", qos=1)

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
        # The broker handles a connection's packets in order: the marker's PUBLISH after
        # the SUBSCRIBE, whose retained configs it has queued by then.
        self._subscribe_and_mark()
        try:
            await asyncio.wait_for(asyncio.shield(self._synced), self._timeout_s)
        except TimeoutError:
            await self.stop()
            raise IotgwError(
                f"the MQTT broker at {self._endpoint.address} did not send the Home "
                f"Assistant discovery configs within {self._timeout_s:g} s"
            ) from None
        log.info("discovery_configs_read", configs=self.configs)

    def _connected(self, client: Client, flags: int, rc: int, properties: Any) -> None:
        if self._synced is None or not self._synced.done():
            return  # the first connection: start() subscribes
        log.info("discovery_reconnected", configs=len(self._known))
        self._seen = set()
        self._marker = self._new_marker()
        self._subscribe_and_mark()

    def _message(self, client: Client, topic: str, payload: bytes, qos: int, props: Any) -> int:
        if topic.startswith(self._markers):
            if topic != self._marker:
                return 0  # an earlier connection's
            if self._seen is not None:
                for gone in sorted(self._known - self._seen):
                    self._config(gone, b"")
                self._seen = None
            if self._synced is not None and not self._synced.done():
                self._synced.set_result(None)
            return 0
        if self._seen is not None:
            self._seen.add(topic)
        self._config(topic, payload)
        return 0

    def _config(self, topic: str, payload: bytes) -> None:
        if payload.strip():
            self._known.add(topic)
        else:
            self._known.discard(topic)
        self.configs += 1
        self._on_config(topic, payload)

    async def stop(self) -> None:
        if self._client.is_connected:
            await self._client.disconnect()
