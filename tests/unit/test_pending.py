"""Pending devices as pure logic: what the pending topic says, and what the validator holds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.domain.deadletters import Reason
from gateway.domain.pending import PendingBook, Resolution, held_headers, resolution_record
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.sources import parse_sources
from gateway.domain.validation import Accepted, Held, ReadingValidator, Rejected
from schemas import Device, DeviceType

pytestmark = pytest.mark.unit

NOW = 1_795_680_000_000


def held_record(book: PendingBook, offset: int, device_id: str, received_at: int) -> None:
    headers = held_headers("held", f"devices/{device_id}/telemetry", received_at, "envelope", None)
    book.apply(offset, device_id.encode(), headers, b"{}")


def resolved(book: PendingBook, device_id: str, resolution: Resolution, *args: Any) -> None:
    value, headers = resolution_record(resolution, *args)
    book.apply(10_000, device_id.encode(), headers, value)


def test_held_records_are_counted_per_device_from_their_first_offset() -> None:
    """Each device's held records: how many, from which offset, first and last arrival."""
    book = PendingBook()
    for offset, device_id in enumerate(["a", "b", "a", "a"]):
        held_record(book, offset, device_id, NOW + offset)
    a = book.devices["a"]
    assert (a.count, a.since, a.last, a.first_seen, a.last_seen) == (3, 0, 3, NOW, NOW + 3)
    assert book.devices["b"].count == 1


def test_a_resolution_through_the_last_held_record_ends_the_wait() -> None:
    """Approved, denied or expired through its newest held record, a device is no longer pending."""
    book = PendingBook()
    held_record(book, 0, "a", NOW)
    held_record(book, 1, "a", NOW)
    resolved(book, "a", Resolution.DENIED, 1, 2)
    assert "a" not in book
    held_record(book, 1, "a", NOW)  # read again by a follower behind the resolver: still done
    assert "a" not in book


def test_a_partial_expiry_keeps_the_newer_held_records() -> None:
    """Expired through an older record, the newer ones stay held, the oldest of them first."""
    book = PendingBook()
    for offset in range(5):
        held_record(book, offset, "a", NOW + offset)
    resolved(book, "a", Resolution.EXPIRED, 2, 3, NOW + 3)
    a = book.devices["a"]
    assert (a.count, a.since, a.first_seen) == (2, 3, NOW + 3)


def test_a_message_held_here_and_not_read_back_keeps_the_device_pending() -> None:
    """A deny covering what was read does not drop a device whose newest message is in flight."""
    book = PendingBook()
    held_record(book, 0, "a", NOW)
    book.note_held("a", NOW + 5, "envelope", "thermostat")
    resolved(book, "a", Resolution.DENIED, 0, 1)
    assert "a" in book
    held_record(book, 1, "a", NOW + 5)
    assert book.devices["a"].count == 1


REGISTRY = {"known": Device(device_id="known", type=DeviceType.THERMOSTAT, registered_at=0)}


def validator(
    registry: dict[str, Device] | None = None, *, max_devices: int = 10, sources: str = ""
) -> ReadingValidator:
    return ReadingValidator(
        (registry if registry is not None else REGISTRY).get,
        require_registration=True,
        max_age_ms=24 * 3600 * 1000,
        limiter=RateLimiter(1.0, 3),
        clock=lambda: 0.0,
        sources=parse_sources(sources) if sources else None,
        pending=PendingBook(),
        unknown_devices="hold" if not sources else "reject",
        pending_max_devices=max_devices,
    )


def reading(seq: int = 0) -> bytes:
    metrics = {"temperature_c": 21.5}
    return json.dumps({"type": "thermostat", "ts": NOW, "seq": seq, "metrics": metrics}).encode()


def test_an_unknown_device_s_message_is_held_with_its_type() -> None:
    """With hold, an unknown device's message is kept as it came, with the type it tells."""
    [outcome] = validator().process("devices/new/telemetry", reading(), NOW)
    assert outcome == Held("new", reading(), "devices/new/telemetry", NOW, "envelope", "thermostat")


def test_a_pending_device_stays_held_once_registered_until_replayed() -> None:
    """A registered device with held messages has its next ones held too, so none overtakes."""
    registry: dict[str, Device] = {}
    judge = validator(registry)
    judge.process("devices/new/telemetry", reading(0), NOW)
    registry["new"] = Device(device_id="new", type=DeviceType.THERMOSTAT, registered_at=0)
    [later] = judge.process("devices/new/telemetry", reading(1), NOW)
    assert isinstance(later, Held)
    [replayed] = judge.replay("devices/new/telemetry", reading(0), NOW)
    assert isinstance(replayed, Accepted)


def test_a_replay_is_not_rate_limited_again() -> None:
    """Held messages count against the device's rate when they come, not again on replay."""
    registry: dict[str, Device] = {}
    judge = validator(registry)
    outcomes = [judge.process("devices/new/telemetry", reading(s), NOW)[0] for s in range(4)]
    assert [type(o) for o in outcomes] == [Held, Held, Held, Rejected]
    registry["new"] = Device(device_id="new", type=DeviceType.THERMOSTAT, registered_at=0)
    replayed = [judge.replay("devices/new/telemetry", reading(s), NOW)[0] for s in range(3)]
    assert [type(o) for o in replayed] == [Accepted, Accepted, Accepted]


def test_devices_past_the_limit_are_dead_letters_saying_so() -> None:
    """Past IOTGW_PENDING_MAX_DEVICES, an unknown device's message is an unknown_device letter."""
    judge = validator(max_devices=1)
    judge.process("devices/first/telemetry", reading(), NOW)
    [outcome] = judge.process("devices/second/telemetry", reading(), NOW)
    assert isinstance(outcome, Rejected)
    assert outcome.reason == Reason.UNKNOWN_DEVICE
    assert "IOTGW_PENDING_MAX_DEVICES" in outcome.detail
    [again] = judge.process("devices/first/telemetry", reading(1), NOW)
    assert isinstance(again, Held)


def test_a_source_that_holds_while_the_default_rejects() -> None:
    """unknown_devices: hold on one source holds its devices; our envelope still rejects."""
    judge = validator(sources="sources:\n  - {adapter: zigbee2mqtt, unknown_devices: hold}\n")
    state = json.dumps({"temperature": 21.5, "humidity": 40, "pressure": 1013}).encode()
    [held] = judge.process("zigbee2mqtt/hall sensor", state, NOW)
    assert held == Held(
        "hall_sensor", state, "zigbee2mqtt/hall sensor", NOW, "zigbee2mqtt", "climate"
    )
    [rejected] = judge.process("devices/new/telemetry", reading(), NOW)
    assert isinstance(rejected, Rejected)
    assert rejected.reason == Reason.UNKNOWN_DEVICE


def test_an_expiry_of_all_that_was_read_keeps_a_device_with_a_message_in_flight() -> None:
    """Expired through its newest record read, a device held a moment ago stays pending."""
    book = PendingBook()
    held_record(book, 0, "a", NOW)
    book.note_held("a", NOW + 5, "envelope", None)
    book.resolve("a", 0, 1)
    assert "a" in book
    held_record(book, 1, "a", NOW + 5)
    assert (book.devices["a"].count, book.devices["a"].since) == (1, 1)


def test_a_device_being_replayed_stays_pending_whatever_a_record_says() -> None:
    """A deny read while its approval replays does not let its new messages skip the queue."""
    book = PendingBook()
    held_record(book, 0, "a", NOW)
    book.pinned.add("a")
    resolved(book, "a", Resolution.DENIED, 0, 1)
    assert "a" in book
    book.resolve("a", 0, 1, final=True)
    assert "a" not in book


def test_a_record_resolved_before_it_is_read_back_is_no_longer_awaited() -> None:
    """A held message read back after its resolution does not keep its device pending."""
    book = PendingBook()
    book.note_held("a", NOW, "envelope", None)
    resolved(book, "a", Resolution.DENIED, 0, 1)
    held_record(book, 0, "a", NOW)
    assert "a" not in book
