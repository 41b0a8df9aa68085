"""`iotgw devices pending|approve|deny`: devices whose readings are held for approval."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

import typer
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from rich.table import Table

from gateway.adapters.kafka import (
    create_consumer,
    create_producer,
    end_offsets,
    started,
    topic_partitions,
)
from gateway.cli.terminal import console, say, utc_time
from gateway.clock import now_ms
from gateway.domain.deadletters import Reason, dead_letter_headers
from gateway.domain.devices_file import DeviceInputError, build_device
from gateway.domain.pending import (
    RESOLVED,
    PendingBook,
    PendingDevice,
    Resolution,
    resolution_record,
)
from gateway.errors import IotgwError
from gateway.services.bridge.pending import held_messages, pending_partition, read_pending
from gateway.services.registry import DeviceRegistry, RegistryWriter
from gateway.settings import Settings, load_settings
from gateway.topics import Topics

__all__ = ["add_pending_commands"]

DeviceIdArg = Annotated[str, typer.Argument(metavar="ID", help="The device id.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def add_pending_commands(app: typer.Typer) -> None:
    """Add `pending`, `approve` and `deny` to the `devices` command group."""
    app.command("pending")(pending)
    app.command("approve")(approve)
    app.command("deny")(deny)


async def _book_and_registry(settings: Settings) -> tuple[PendingBook, DeviceRegistry]:
    try:
        book = await read_pending(settings)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise IotgwError(f"cannot read the pending devices from Kafka: {exc}") from None
    registry = DeviceRegistry(settings)
    await registry.start()
    return book, registry


def _waiting(book: PendingBook, device_id: str) -> PendingDevice:
    device = book.devices.get(device_id)
    if device is None or not device.count:
        raise IotgwError(
            f"device {device_id} has no held readings (see `iotgw devices pending`)", exit_code=2
        )
    return device


def pending(as_json: JsonOption = False) -> None:
    """Devices the registry does not know whose readings are held, awaiting approval."""
    settings = load_settings()

    async def work() -> tuple[list[PendingDevice], set[str]]:
        book, registry = await _book_and_registry(settings)
        await registry.stop()
        devices = sorted((d for d in book.devices.values() if d.count), key=lambda d: d.first_seen)
        return devices, {d.device_id for d in devices if d.device_id in registry}

    devices, approved = asyncio.run(work())
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "device_id": d.device_id,
                        "source": d.source,
                        "type": d.type,
                        "held": d.count,
                        "first_seen": d.first_seen,
                        "last_seen": d.last_seen,
                        "approved": d.device_id in approved,
                    }
                    for d in devices
                ]
            )
        )
        return
    if not devices:
        console.print("no device awaits approval", highlight=False)
        return
    table = Table("device", "source", "type (inferred)", "held", "first seen", "last seen")
    for d in devices:
        note = " (approved: the bridge replays them)" if d.device_id in approved else ""
        table.add_row(
            d.device_id + note, d.source, d.type or "?", str(d.count),
            utc_time(d.first_seen), utc_time(d.last_seen),
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{len(devices)} pending; `iotgw devices approve ID` lets one in with its held readings",
        highlight=False,
    )


def approve(
    device_id: DeviceIdArg,
    device_type: Annotated[
        str | None, typer.Option("--type", help="Its type (default: the one inferred).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A name people know it by.")] = None,
    site: Annotated[str | None, typer.Option(help="The building or home.")] = None,
    room: Annotated[str | None, typer.Option(help="The room.")] = None,
    tz: Annotated[str | None, typer.Option(help="IANA time zone of its clock.")] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds to wait for the bridge to replay its readings.")
    ] = 60.0,
) -> None:
    """Register a pending device; the bridge then moves its held readings into iot.readings,
    in the order they came and before any later reading of it."""
    settings = load_settings()

    async def work() -> tuple[int, int | None]:
        book, registry = await _book_and_registry(settings)
        try:
            held = _waiting(book, device_id)
            kind = device_type or held.type
            if kind is None:
                raise IotgwError(
                    f"cannot tell the type of {device_id} from its readings; give --type",
                    exit_code=2,
                )
            if device_id not in registry:
                try:
                    device = build_device(
                        device_id, kind, registered_at=now_ms(), name=name, site=site,
                        room=room, tz=tz, catalogue=settings.catalogue(),
                    )  # fmt: skip
                except DeviceInputError as exc:
                    raise IotgwError(str(exc), exit_code=2) from None
                topic = Topics(settings.topic_prefix).pending
                tp = pending_partition(topic, await topic_partitions(settings, topic), device_id)
                start = (await end_offsets(settings, tp.topic))[tp]
                async with RegistryWriter(settings) as writer:
                    await writer.put(device)
                say(f"registered {device_id} ({kind}); waiting for the bridge to replay")
            else:
                topic = Topics(settings.topic_prefix).pending
                tp = pending_partition(topic, await topic_partitions(settings, topic), device_id)
                start = held.last if held.last is not None else 0
        finally:
            await registry.stop()
        return held.count, await _approved(settings, tp, start, device_id, wait)

    held, replayed = asyncio.run(work())
    if replayed is None:
        console.print(
            f"approved {device_id}; no bridge replayed its {held} held readings within "
            f"{wait:g} s: a running bridge does so within a second, one that starts, at start",
            highlight=False,
        )
    else:
        console.print(
            f"approved {device_id}: {replayed} held readings replayed into iot.readings",
            highlight=False,
        )


def deny(device_id: DeviceIdArg) -> None:
    """Turn a pending device's held readings into `unknown_device` dead letters."""
    settings = load_settings()

    async def work() -> int:
        book, registry = await _book_and_registry(settings)
        try:
            held = _waiting(book, device_id)
            if device_id in registry:
                raise IotgwError(
                    f"device {device_id} is registered: the bridge replays its readings",
                    exit_code=2,
                )
        finally:
            await registry.stop()
        topics = Topics(settings.topic_prefix)
        tp = pending_partition(
            topics.pending, await topic_partitions(settings, topics.pending), device_id
        )
        assert held.since is not None
        end = (await end_offsets(settings, tp.topic))[tp]
        detail = f"device {device_id} was denied (iotgw devices deny)"
        producer = await started(create_producer(settings), settings)
        try:
            count, through, sends = 0, -1, []
            async for offset, topic, payload, received_at in held_messages(
                settings, device_id, tp, held.since, end
            ):
                headers = dead_letter_headers(Reason.UNKNOWN_DEVICE, detail, topic, received_at)
                sends.append(
                    await producer.send(
                        topics.dead_letters, payload, key=device_id.encode(), headers=headers
                    )
                )
                count, through = count + 1, offset
            await asyncio.gather(*sends)
            if count:
                value, headers = resolution_record(Resolution.DENIED, through, count)
                await producer.send_and_wait(
                    topics.pending, value, key=device_id.encode(), headers=headers
                )
        finally:
            await producer.stop()
        return count

    count = asyncio.run(work())
    console.print(
        f"denied {device_id}: {count} held readings sent to the dead-letter topic "
        "(unknown_device); readings it sends from now on are held again",
        highlight=False,
    )


async def _approved(
    settings: Settings, tp: TopicPartition, start: int, device_id: str, wait: float
) -> int | None:
    """How many held readings the bridge replayed, once its `approved` record for the device
    appears in the pending topic after offset `start`; None if it does not within `wait` s."""
    key = device_id.encode()
    deadline = time.monotonic() + wait
    consumer = await started(create_consumer(settings, fetch_max_wait_ms=200), settings)
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        while (left := deadline - time.monotonic()) > 0:
            batches = await consumer.getmany(tp, timeout_ms=int(min(left, 1.0) * 1000))
            for record in batches.get(tp, []):
                said: dict[str, bytes] = dict(record.headers or ())
                if record.key != key or said.get("pending") != RESOLVED:
                    continue
                value = json.loads(record.value or b"{}")
                if value.get("resolution") == Resolution.APPROVED.value:
                    return int(value.get("count", 0))
    finally:
        await consumer.stop()
    return None
