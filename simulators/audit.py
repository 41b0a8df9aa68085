"""The loss audit: what a simulation sent against what Kafka and InfluxDB hold."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import read_topic
from gateway.errors import IotgwError
from gateway.services.bridge.pending import read_pending
from gateway.settings import Settings
from gateway.topics import Topics
from simulators.fleet import FAULTS, digest
from simulators.formats import Format

# How the audit finds a reading: (device id, "seq", its seq) for our envelope, (device id,
# "ts", its device time in epoch ms) for the formats without seq (unique per device).
Key = tuple[str, str, int]
# Kafka's record time is the bridge's, a little after the device's: read from a minute before.
_SLACK_MS = 60_000


@dataclass
class AuditReport:
    """The audit's findings; `lost` must be 0."""

    sent: int = 0
    valid_sent: int = 0
    in_kafka: int = 0
    in_dlq: int = 0
    # Readings of unknown devices held in iot.readings.pending, awaiting approval.
    held: int = 0
    in_influx: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicates_sent: int = 0
    missing_in_influx: int = 0
    # Points of one reading written more than once (a replay must overwrite, not add).
    duplicates_in_influx: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    expected_rejected: dict[str, int] = field(default_factory=dict)
    lost_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def entry_key(entry: dict[str, Any]) -> Key | None:
    """The key of a log entry's reading (None: a time that is no epoch ms, a fault's)."""
    if entry["format"] == Format.ENVELOPE:
        return (entry["device_id"], "seq", entry["seq"])
    ts = entry["ts"]
    return (entry["device_id"], "ts", ts) if isinstance(ts, int) else None


def reading_key(value: bytes) -> Key | None:
    """The key of a canonical reading of `iot.readings`: by `seq` when it has one (our
    envelope), else by its device time."""
    try:
        document = json.loads(value)
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("device_id"), str):
        return None
    if isinstance(document.get("seq"), int):
        return (document["device_id"], "seq", document["seq"])
    if isinstance(document.get("ts"), int):
        return (document["device_id"], "ts", document["ts"])
    return None


def _envelope_key(value: bytes, device_id: str) -> Key | None:
    """The key of one envelope reading's bytes (a batch's dead letters are one a reading)."""
    try:
        document = json.loads(value)
    except ValueError:
        return None
    if not isinstance(document, dict) or not isinstance(document.get("seq"), int):
        return None
    return (device_id, "seq", document["seq"])


@dataclass
class SendLog:
    """A simulation's log: one entry per reading sent."""

    entries: list[dict[str, Any]]

    @classmethod
    def read(cls, path: Path) -> SendLog:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise IotgwError(f"cannot read {path}: {exc.strerror}", exit_code=2) from None
        entries = []
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                kept = {k: entry[k] for k in ("device_id", "seq", "ts", "fault")}
                # Logs written before the other formats: envelope readings, no digest.
                kept["format"] = Format(entry.get("format", Format.ENVELOPE))
                kept["digest"] = str(entry.get("digest", ""))
                entries.append(kept)
            except (ValueError, KeyError, TypeError):
                raise IotgwError(f"{path}: line {number} is not a log entry", exit_code=2) from None
        if not entries:
            raise IotgwError(f"{path} holds no readings", exit_code=2)
        return cls(entries)

    @property
    def valid(self) -> set[Key]:
        return {
            key
            for e in self.entries
            if FAULTS.get(e["fault"]) is None and (key := entry_key(e)) is not None
        }

    @property
    def by_digest(self) -> dict[str, set[Key]]:
        """The keys of the valid readings each payload carried, by the payload's digest
        (a valid reading may still be a dead letter: over a device's rate limit)."""
        found: dict[str, set[Key]] = {}
        for entry in self.entries:
            key = entry_key(entry)
            if entry["digest"] and key is not None and FAULTS.get(entry["fault"]) is None:
                found.setdefault(entry["digest"], set()).add(key)
        return found

    @property
    def devices(self) -> set[str]:
        return {e["device_id"] for e in self.entries}

    def devices_keyed_by(self, kind: str) -> set[str]:
        """The devices whose readings the audit finds by `seq`, or by `ts`."""
        envelope = kind == "seq"
        return {
            e["device_id"] for e in self.entries if (e["format"] == Format.ENVELOPE) == envelope
        }

    @property
    def window_ms(self) -> tuple[int, int]:
        times = [e["ts"] for e in self.entries if isinstance(e["ts"], int)]
        return min(times), max(times)


async def read_since(
    settings: Settings, topic: str, since_ms: int, *, committed_only: bool = False
) -> list[Any]:
    """Every record of `topic` from `since_ms` to its end offsets at the time of the call
    (of committed transactions only with `committed_only`)."""
    records: list[Any] = []
    end = await read_topic(
        settings, topic, records.extend, committed_only=committed_only, since_ms=since_ms
    )
    return [r for r in records if r.offset < end[TopicPartition(r.topic, r.partition)]]


def _points(results: list[Any]) -> list[dict[str, Any]]:
    """The points of InfluxQL results, each a dict of its columns."""
    return [
        dict(zip(series["columns"], row, strict=True))
        for result in results
        for series in result.get("series", [])
        for row in series.get("values", [])
    ]


async def _influx_keys(settings: Settings, log: SendLog) -> Counter[Key]:
    """The points of the log's devices in InfluxDB: an envelope reading's by its `seq`
    field, another format's by its time (its device time)."""
    first, last = log.window_ms
    types = "|".join(settings.catalogue().names)
    window = f"time >= {first - _SLACK_MS}ms AND time <= {last + _SLACK_MS}ms"
    found: Counter[Key] = Counter()
    async with InfluxClient.for_settings(settings, timeout_s=60) as influx:
        for kind in ("seq", "ts"):
            devices = log.devices_keyed_by(kind)
            if not devices:
                continue
            ids = "|".join(re.escape(d) for d in sorted(devices))
            # Readings without seq have no field every point holds: all of them.
            fields = '"seq", "device_id"' if kind == "seq" else "*"
            query = (
                f'SELECT {fields} FROM /^({types})$/ WHERE {window} AND "device_id" =~ /^({ids})$/'
            )
            try:
                points = _points(await influx.query(query, db=settings.influx_database))
            except IotgwError as exc:
                if "database not found" in str(exc):
                    return Counter()
                raise
            for point in points:
                value = point.get(kind) if kind == "seq" else point["time"]
                if value is not None:
                    found[(point["device_id"], kind, int(value))] += 1
    return found


async def audit(settings: Settings, log: SendLog) -> AuditReport:
    """Compare the log with iot.readings, iot.readings.dlq and InfluxDB."""
    topics = Topics(settings.topic_prefix)
    since = log.window_ms[0] - _SLACK_MS
    readings, dead, pending = await asyncio.gather(
        read_since(settings, topics.readings, since),
        read_since(settings, topics.dead_letters, since),
        read_pending(settings),
    )
    devices = log.devices
    in_kafka: Counter[Key] = Counter()
    for record in readings:
        key = reading_key(record.value)
        if key is not None and key[0] in devices:
            in_kafka[key] += 1
    in_dlq: set[Key] = set()
    rejected: Counter[str] = Counter()
    by_digest = log.by_digest
    for record in dead:
        device_id = record.key.decode(errors="replace") if record.key else None
        if device_id is None or device_id not in devices:
            continue
        reason = dict(record.headers).get("error", b"?").decode()
        rejected[reason] += 1
        # A dead letter holds the payload's bytes (a batch's: each reading's own).
        carried = by_digest.get(digest(record.value))
        if carried:
            in_dlq.update(carried)
        elif (key := _envelope_key(record.value, device_id)) is not None:
            in_dlq.add(key)
    valid = log.valid
    lost = sorted(valid - set(in_kafka) - in_dlq)
    influx = await _influx_keys(settings, log)
    delivered = valid & set(in_kafka)
    sent_faults = Counter(e["fault"] for e in log.entries if e["fault"])
    expected: Counter[str] = Counter()
    for fault, count in sent_faults.items():
        reason = FAULTS.get(fault)
        if reason:
            expected[reason] += count
    return AuditReport(
        sent=len(log.entries),
        valid_sent=len(valid),
        in_kafka=len(delivered),
        in_dlq=sum(rejected.values()),
        held=sum(d.count for d in pending.devices.values() if d.device_id in devices),
        in_influx=len(delivered & set(influx)),
        lost=len(lost),
        duplicates=sum(n - 1 for n in in_kafka.values()),
        duplicates_sent=sent_faults.get("duplicate", 0),
        missing_in_influx=len(delivered - set(influx)),
        duplicates_in_influx=sum(n - 1 for key, n in influx.items() if key in valid),
        rejected=dict(sorted(rejected.items())),
        expected_rejected=dict(sorted(expected.items())),
        lost_examples=[f"{d}{'#' if kind == 'seq' else '@'}{n}" for d, kind, n in lost[:10]],
    )


async def audit_until_settled(settings: Settings, log: SendLog, wait_s: float) -> AuditReport:
    """Audit again until nothing is lost or missing in InfluxDB, for up to `wait_s` seconds
    (the bridge and the writer may still be working through the last readings)."""
    deadline = time.monotonic() + wait_s
    while True:
        report = await audit(settings, log)
        if (report.lost == 0 and report.missing_in_influx == 0) or time.monotonic() > deadline:
            return report
        await asyncio.sleep(2)
