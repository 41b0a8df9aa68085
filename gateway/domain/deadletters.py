"""Dead letters: why a record went to the dead-letter topic, and the headers that say so."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DETAIL_MAX", "Headers", "Reason", "dead_letter_headers"]

# A dead letter's `detail` is cut to this many characters.
DETAIL_MAX = 300

Headers = list[tuple[str, bytes]]


class Reason(StrEnum):
    """Why a record went to the dead-letter topic (its `error` header).

    The bridge's reasons are DESIGN.md's ("Rejections"); the writer adds its own two for
    records it could not turn into points or that InfluxDB refused.
    """

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    SCHEMA = "schema"
    ID_MISMATCH = "id_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_DISABLED = "device_disabled"
    TYPE_MISMATCH = "type_mismatch"
    CLOCK_SKEW = "clock_skew"
    RATE_LIMITED = "rate_limited"
    # The writer's: a record of iot.readings, iot.availability or iot.alerts InfluxDB
    # refused as a point.
    INFLUX_REJECTED = "influx_rejected"


def dead_letter_headers(
    reason: Reason,
    detail: str,
    mqtt_topic: str,
    received_at: int,
    source_topic: str | None = None,
) -> Headers:
    """The headers of a dead letter (DESIGN.md, "Kafka"): why, and where it came from;
    `source_topic` when a consumer (the writer) sends back a record of another topic."""
    headers = [
        ("error", reason.value.encode()),
        ("detail", detail[:DETAIL_MAX].encode()),
        ("mqtt_topic", mqtt_topic.encode()),
        ("received_at", str(received_at).encode()),
    ]
    if source_topic is not None:
        headers.append(("source_topic", source_topic.encode()))
    return headers
