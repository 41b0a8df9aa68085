"""Which device a message is about, and which of the bridge's workers owns that device."""

from __future__ import annotations

import zlib

from gateway.domain.sources import Sources
from gateway.topics import status_device_id, telemetry_device_id

__all__ = ["device_of", "owner", "worker_of"]


def device_of(topic: str, sources: Sources | None = None) -> str | None:
    """The device a topic is about: the id in our envelope's topics (readings, status), or
    the one a device source derives from its own; None for a topic of neither."""
    device = telemetry_device_id(topic) or status_device_id(topic)
    if device is None and sources:
        route = sources.route(topic) or sources.presence_route(topic)
        device = route[1] if route else None
    return device


def owner(topic: str, workers: int, sources: Sources | None = None) -> int:
    """The worker that owns the device a topic is about: a stable hash of its id, the same
    in every process and after every restart."""
    return worker_of(device_of(topic, sources) or topic, workers)


def worker_of(device: str, workers: int) -> int:
    return zlib.crc32(device.encode()) % workers
