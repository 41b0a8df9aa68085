"""Pending devices: what `iot.readings.pending` holds and what it says (pure logic).

The topic is a log, keyed by device id, of two kinds of records (header `pending`):

- `held`: a message of a device the registry does not know, kept as it arrived (the
  original bytes, the headers a dead letter would have, plus `source` and the `type`
  inferred from it when one could be);
- `resolved`: what became of that device's held records up to an offset (`through`):
  `approved` (replayed into `iot.readings`), `denied` or `expired` (sent to the dead-letter
  topic); its JSON value also says how many (`count`) and, when some stay held, the
  arrival time of the oldest of those (`first_remaining`).

A device's held records and their resolutions share a partition, so reading it in order
tells exactly which records are still held: the `held` ones after the last `through`.
`PendingBook` keeps that fold per device; the bridge's workers (for the devices they own)
and `iotgw devices pending` (for all) build it from the topic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.domain.deadletters import Headers, dead_letter_headers
from gateway.domain.deadletters import Reason as DeadLetterReason

__all__ = [
    "HELD",
    "RESOLVED",
    "PendingBook",
    "PendingDevice",
    "Resolution",
    "held_headers",
    "resolution_record",
]

HELD = b"held"
# Resolutions remembered by device (past this many, the oldest are forgotten).
_RESOLVED_REMEMBERED = 100_000
RESOLVED = b"resolved"


class Resolution(StrEnum):
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


def held_headers(
    detail: str, mqtt_topic: str, received_at: int, source: str, kind: str | None
) -> Headers:
    """A held record's headers: a dead letter's (`unknown_device`), where it came from and
    what type it looked like."""
    headers = dead_letter_headers(DeadLetterReason.UNKNOWN_DEVICE, detail, mqtt_topic, received_at)
    headers += [("pending", HELD), ("source", source.encode())]
    if kind is not None:
        headers.append(("type", kind.encode()))
    return headers


def resolution_record(
    resolution: Resolution, through: int, count: int, first_remaining: int | None = None
) -> tuple[bytes, Headers]:
    """The value and headers of a `resolved` record."""
    value: dict[str, Any] = {"resolution": resolution.value, "through": through, "count": count}
    if first_remaining is not None:
        value["first_remaining"] = first_remaining
    return json.dumps(value).encode(), [("pending", RESOLVED)]


@dataclass
class PendingDevice:
    """A device with held records, as far as the topic has been read."""

    device_id: str
    source: str
    type: str | None
    first_seen: int  # arrival (epoch ms) of its oldest held record
    last_seen: int  # arrival of its newest
    count: int = 0  # held records read back and not resolved
    since: int | None = None  # offset of the oldest of those (None: none read back yet)
    last: int | None = None  # offset of the newest held record read back
    unseen: int = 0  # messages held by this process and not read back yet
    mqtt_topics: set[str] = field(default_factory=set)


class PendingBook:
    """Every pending device: the fold of `iot.readings.pending` (and of what this process
    held a moment ago and has not read back yet)."""

    def __init__(self) -> None:
        self.devices: dict[str, PendingDevice] = {}
        # The newest resolution's `through` by device: held records up to it are done with,
        # whenever they are read (a follower behind the resolver may read them after it).
        self._through: dict[str, int] = {}
        # Devices whose held records are being replayed: whatever a record read says (a
        # `deny` from elsewhere), they stay until the replay ends (with `resolve(final)`),
        # so their new messages keep being held behind the replayed ones.
        self.pinned: set[str] = set()

    def __contains__(self, device_id: object) -> bool:
        return device_id in self.devices

    def __len__(self) -> int:
        return len(self.devices)

    def note_held(self, device_id: str, received_at: int, source: str, kind: str | None) -> None:
        """A message this process has just sent to the topic (it reads it back later)."""
        device = self.devices.get(device_id)
        if device is None:
            device = self.devices[device_id] = PendingDevice(
                device_id, source, kind, received_at, received_at
            )
        device.unseen += 1
        device.last_seen = max(device.last_seen, received_at)
        if device.type is None:
            device.type = kind

    def apply(self, offset: int, key: bytes | None, headers: Any, value: bytes | None) -> None:
        """Fold one record read from the topic, in offset order per partition."""
        if key is None:
            return
        device_id = key.decode(errors="replace")
        said: dict[str, bytes] = dict(headers or ())
        if said.get("pending") == RESOLVED:
            self._resolved(device_id, value)
        elif said.get("pending") == HELD:
            self._held(device_id, offset, said)

    def resolve(
        self,
        device_id: str,
        through: int,
        count: int,
        first_remaining: int | None = None,
        *,
        final: bool = False,
    ) -> None:
        """What this process has just resolved (and written): held records up to `through`,
        `count` of them; some stay held if `first_remaining` (the oldest's arrival) is set.
        `final`: nothing of the device is held any more, not even in flight (an approval
        that kept its new messages aside until now): it leaves the book."""
        self._done_through(device_id, through)
        device = self.devices.get(device_id)
        if device is None:
            return
        if final:
            del self.devices[device_id]
        elif first_remaining is not None:
            device.since = through + 1
            device.count = max(0, device.count - count)
            device.first_seen = first_remaining
        else:
            self._all_resolved(device)

    def _done_through(self, device_id: str, through: int) -> None:
        if len(self._through) >= _RESOLVED_REMEMBERED and device_id not in self._through:
            del self._through[next(iter(self._through))]
        self._through[device_id] = max(through, self._through.get(device_id, -1))

    def _all_resolved(self, device: PendingDevice) -> None:
        """Every held record read back is resolved: the device leaves the book, unless
        messages held here are still to be read back, or it is pinned."""
        if device.unseen == 0 and device.device_id not in self.pinned:
            del self.devices[device.device_id]
            return
        device.count, device.since, device.last = 0, None, None
        device.first_seen = device.last_seen

    def _held(self, device_id: str, offset: int, said: dict[str, bytes]) -> None:
        if offset <= self._through.get(device_id, -1):
            device = self.devices.get(device_id)
            if device is not None:
                device.unseen = max(0, device.unseen - 1)  # resolved before read back
                if device.since is None:
                    self._all_resolved(device)
            return
        try:
            received_at = int(said.get("received_at", b"0"))
        except ValueError:
            received_at = 0
        source = said.get("source", b"").decode(errors="replace")
        kind = said["type"].decode(errors="replace") if "type" in said else None
        topic = said.get("mqtt_topic", b"").decode(errors="replace")
        device = self.devices.get(device_id)
        if device is None:
            device = self.devices[device_id] = PendingDevice(
                device_id, source, kind, received_at, received_at
            )
        elif device.count == 0:
            device.first_seen = received_at
        device.unseen = max(0, device.unseen - 1)
        device.count += 1
        if device.since is None:
            device.since = offset
        device.last = offset
        device.last_seen = max(device.last_seen, received_at)
        device.type = kind or device.type
        if len(device.mqtt_topics) < 8:
            device.mqtt_topics.add(topic)

    def _resolved(self, device_id: str, value: bytes | None) -> None:
        try:
            said = json.loads(value or b"")
            through, count = int(said["through"]), int(said["count"])
            first_remaining = said.get("first_remaining")
        except (ValueError, KeyError, TypeError):
            return
        self._done_through(device_id, through)
        device = self.devices.get(device_id)
        if device is None or device.since is None or device.last is None:
            return
        if through < device.since:
            return  # about records before the ones held now
        if through >= device.last:
            self._all_resolved(device)
            return
        device.since = through + 1
        device.count = max(0, device.count - count)
        if isinstance(first_remaining, int):
            device.first_seen = first_remaining
