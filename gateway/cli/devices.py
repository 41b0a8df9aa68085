"""`iotgw devices ...`: register, list, show, enable, disable, remove and import devices,
and rebuild their last-known state."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from gateway.adapters.mosquitto_auth import GATEWAY_USER, PasswordFile, generate_password
from gateway.cli.stack import devstack
from gateway.cli.terminal import console, errors, utc_time
from gateway.clock import now_ms
from gateway.domain.devices_file import DeviceInputError, build_device, parse_devices_csv
from gateway.domain.records import DeviceState, MetricValue
from gateway.errors import IotgwError
from gateway.services.registry import DeviceRegistry, RegistryWriter
from gateway.services.state import read_states, rebuild_states
from gateway.settings import Settings, load_settings
from schemas import Device

__all__ = ["devices_app"]

devices_app = typer.Typer(
    help="The device registry (Kafka topic iot.devices).", no_args_is_help=True
)

T = TypeVar("T")

DeviceIdArg = Annotated[str, typer.Argument(metavar="ID", help="The device id.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TzOption = Annotated[
    str | None,
    typer.Option(
        help="IANA time zone of the device's clock (e.g. Europe/Berlin), for devices that send "
        "local time without an offset; default IOTGW_DEFAULT_TZ."
    ),
]
CredentialsOption = Annotated[
    bool,
    typer.Option(
        "--credentials",
        help="Make an MQTT password for the secure listener (printed once; only its hash is kept).",
    ),
]


def _run_with_registry(work: Callable[[Settings, DeviceRegistry], Awaitable[T]]) -> T:
    """Load the registry to its end, then run `work` with it."""
    settings = load_settings()

    async def main() -> T:
        async with DeviceRegistry(settings) as registry:
            return await work(settings, registry)

    return asyncio.run(main())


def _existing(registry: DeviceRegistry, device_id: str) -> Device:
    device = registry.get(device_id)
    if device is None:
        raise IotgwError(f"device {device_id} is not registered")
    return device


def _span(ms: int) -> str:
    seconds = ms // 1000
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 120 * 60:
        return f"{seconds // 60} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def _age(ms: int, now: int) -> str:
    """How long ago `ms` was: `12 s ago`, `3 min ago`; a device clock ahead is `... ahead`."""
    return f"{_span(now - ms)} ago" if ms <= now else f"{_span(ms - now)} ahead"


def _online(state: DeviceState | None) -> str:
    if state is None or state["online"] is None:
        return "unknown"
    return "online" if state["online"] else "offline"


def _device_table(
    devices: list[Device], states: dict[str, DeviceState] | None = None, now: int = 0
) -> Table:
    """The registry's fields; with `states`, whether each device is online and when it
    was last seen."""
    table = Table("device_id", "type", "name", "site", "room", "tz", "enabled", "registered")
    if states is not None:
        table.add_column("online")
        table.add_column("last seen")
    for d in devices:
        row = [
            d.device_id,
            d.type,
            d.name or "",
            d.site or "",
            d.room or "",
            d.tz or "",
            "yes" if d.enabled else "[red]no[/red]",
            utc_time(d.registered_at),
        ]
        if states is not None:
            state = states.get(d.device_id)
            last_seen = state["last_seen"] if state is not None else None
            row += [_online(state), "never" if last_seen is None else _age(last_seen, now)]
        table.add_row(*row)
    return table


def _site_counts(devices: list[Device], states: dict[str, DeviceState]) -> Table:
    """Devices online, offline and unknown (never said), per site."""
    counts: dict[str, Counter[str]] = {}
    for d in devices:
        counts.setdefault(d.site or "(none)", Counter())[_online(states.get(d.device_id))] += 1
    table = Table("site")
    for column in ("online", "offline", "unknown"):
        table.add_column(column, justify="right")
    for site, count in sorted(counts.items()):
        table.add_row(site, str(count["online"]), str(count["offline"]), str(count["unknown"]))
    return table


def _value(value: MetricValue) -> str:
    return json.dumps(value)


def _print_state(state: DeviceState | None, now: int) -> None:
    """Online or offline since when, last seen, and each metric's value and age."""
    if state is None:
        console.print("state      none yet: no reading or availability message merged")
        return
    if state["online"] is None or state["online_since"] is None:
        status = "unknown: no availability message yet"
    else:
        since = state["online_since"]
        status = f"{_online(state)} since {utc_time(since)} ({_age(since, now)})"
    last_seen = state["last_seen"]
    seen = "never" if last_seen is None else f"{utc_time(last_seen)} ({_age(last_seen, now)})"
    console.print(f"status     {status}\nlast seen  {seen}", highlight=False, markup=False)
    metrics = Table.grid(padding=(0, 2))
    metrics.add_column(justify="right")
    metrics.add_column()
    metrics.add_column()
    for name, metric in sorted(state["metrics"].items()):
        metrics.add_row(_value(metric["value"]), name, _age(metric["ts"], now))
    console.print(metrics, highlight=False)


def _print_json(value: object) -> None:
    # Plain print: JSON for scripts must not be wrapped or highlighted.
    print(json.dumps(value, ensure_ascii=False))


def _local_password_file() -> Path | None:
    """The local stack's password file, in a checkout of iotgw; None elsewhere."""
    try:
        plan = devstack().StackPlan()
    except IotgwError:
        return None
    path: Path = plan.password_file
    return path


def _password_file(settings: Settings) -> PasswordFile:
    """Mosquitto's password file: IOTGW_MQTT_PASSWORD_FILE, else the local stack's."""
    path = settings.mqtt_password_file or _local_password_file()
    if path is None:
        raise IotgwError("set IOTGW_MQTT_PASSWORD_FILE: the broker's password file", exit_code=2)
    return PasswordFile(path)


def _reload_broker(settings: Settings) -> None:
    """Tell the user how the broker learns of a changed password file, making it so if we can."""
    path = _password_file(settings).path
    local = _local_password_file()
    if local is not None and path.resolve() == local.resolve():
        if not devstack().reload_mosquitto():
            say_quietly("the local stack's Mosquitto is not running; it reads the logins at start")
        return
    say_quietly(
        f"{path} changed: Mosquitto reads it on SIGHUP "
        "(the Compose deployment's broker does so within 2 s)"
    )


def say_quietly(message: str) -> None:
    errors.print(message, highlight=False, markup=False, soft_wrap=True)


def _check_login_name(device_id: str) -> None:
    if device_id == GATEWAY_USER:
        raise IotgwError(
            f"{GATEWAY_USER} is the gateway's own login on the secure listener: "
            "a device with this id cannot have credentials",
            exit_code=2,
        )


def _issue_credentials(settings: Settings, device_id: str) -> str:
    """A new password for `device_id` on the secure listener; its hash replaces any older one."""
    _check_login_name(device_id)
    password = generate_password()
    _password_file(settings).set(device_id, password)
    _reload_broker(settings)
    return password


def _revoke_credentials(settings: Settings, device_id: str) -> bool:
    """Take `device_id`'s login out of the password file; the broker drops its connections."""
    if device_id == GATEWAY_USER or not _password_file(settings).remove(device_id):
        return False
    _reload_broker(settings)
    return True


def _print_password(device_id: str, password: str, as_json: bool) -> None:
    if as_json:
        _print_json({"device_id": device_id, "password": password})
    else:
        print(f"MQTT password of {device_id} (shown only now; only its hash is kept): {password}")


@devices_app.command("register")
def register(
    device_id: DeviceIdArg,
    device_type: Annotated[
        str,
        typer.Option(
            "--type",
            help="thermostat, air_quality, motion, contact, smart_plug, climate, or a type "
            "of the types file (IOTGW_TYPES_FILE).",
        ),
    ],
    name: Annotated[str | None, typer.Option(help="A name people know it by.")] = None,
    site: Annotated[str | None, typer.Option(help="The building or home.")] = None,
    room: Annotated[str | None, typer.Option(help="The room.")] = None,
    tz: TzOption = None,
    update: Annotated[bool, typer.Option(help="Change a device that is registered.")] = False,
    credentials: CredentialsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Register a device (or change one with --update); --credentials gives it an MQTT login."""
    try:
        device = build_device(
            device_id,
            device_type,
            registered_at=now_ms(),
            name=name,
            site=site,
            room=room,
            tz=tz,
            catalogue=load_settings().catalogue(),
        )
    except DeviceInputError as exc:
        raise IotgwError(str(exc), exit_code=2) from None

    async def work(settings: Settings, registry: DeviceRegistry) -> str:
        old = registry.get(device_id)
        if old is not None and not update:
            raise IotgwError(f"device {device_id} is already registered; use --update to change it")
        new = device
        if old is not None:
            given = {"name": name, "site": site, "room": room, "tz": tz}
            new = old.model_copy(
                update={"type": device.type}
                | {k: getattr(device, k) for k, v in given.items() if v}
            )
        async with RegistryWriter(settings) as writer:
            await writer.put(new)
        return "updated" if old is not None else "registered"

    if credentials:
        _check_login_name(device_id)
    done = _run_with_registry(work)
    if credentials:
        password = _issue_credentials(load_settings(), device_id)
        if not as_json:
            console.print(f"{done} {device_id} ({device.type})", highlight=False)
        _print_password(device_id, password, as_json)
    elif as_json:
        _print_json({"device_id": device_id, "result": done})
    else:
        console.print(f"{done} {device_id} ({device.type})", highlight=False)


@devices_app.command("list")
def list_devices(
    device_type: Annotated[str | None, typer.Option("--type", help="Only this type.")] = None,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    status: Annotated[
        bool,
        typer.Option(
            "--status",
            help="Add online and last seen (iot.devices.state), and the counts per site.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List registered devices, sorted by id."""

    async def work(
        settings: Settings, registry: DeviceRegistry
    ) -> tuple[list[Device], dict[str, DeviceState] | None]:
        devices = sorted(
            (
                d
                for d in registry
                if (device_type is None or d.type == device_type)
                and (site is None or d.site == site)
            ),
            key=lambda d: d.device_id,
        )
        return devices, await read_states(settings) if status else None

    devices, states = _run_with_registry(work)
    if as_json:
        _print_json(
            [
                d.model_dump(mode="json")
                | ({} if states is None else {"state": states.get(d.device_id)})
                for d in devices
            ]
        )
    elif devices:
        console.print(_device_table(devices, states, now_ms()))
        console.print(f"{len(devices)} device(s)")
        if states is not None:
            console.print(_site_counts(devices, states))
    else:
        console.print("no devices")


@devices_app.command("show")
def show(device_id: DeviceIdArg, as_json: JsonOption = False) -> None:
    """Show one device: its registry record and its last-known state (iot.devices.state)."""

    async def work(
        settings: Settings, registry: DeviceRegistry
    ) -> tuple[Device, DeviceState | None]:
        device = _existing(registry, device_id)
        return device, (await read_states(settings)).get(device_id)

    device, state = _run_with_registry(work)
    if as_json:
        _print_json(device.model_dump(mode="json") | {"state": state})
    else:
        console.print(_device_table([device]))
        _print_state(state, now_ms())


@devices_app.command("state-rebuild")
def state_rebuild() -> None:
    """Rebuild every device's last-known state from iot.readings and iot.availability, read
    from their beginning (stop `iotgw run state` first)."""
    settings = load_settings()
    with console.status("merging iot.readings and iot.availability from their beginning"):
        rebuilt = asyncio.run(rebuild_states(settings))
    skipped = f", skipped {rebuilt.skipped} bad record(s)" if rebuilt.skipped else ""
    console.print(
        f"rebuilt the state of {rebuilt.devices} device(s) from {rebuilt.readings} reading(s) "
        f"and {rebuilt.availability} availability record(s){skipped}",
        highlight=False,
    )


def _set_enabled(device_id: str, enabled: bool, *, quiet: bool = False) -> Settings:
    word = "enabled" if enabled else "disabled"

    async def work(settings: Settings, registry: DeviceRegistry) -> bool:
        device = _existing(registry, device_id)
        if device.enabled == enabled:
            return False
        async with RegistryWriter(settings) as writer:
            await writer.put(device.model_copy(update={"enabled": enabled}))
        return True

    settings = load_settings()
    changed = _run_with_registry(work)
    if not quiet:
        console.print(f"{word} {device_id}" if changed else f"{device_id} was already {word}")
    return settings


@devices_app.command("enable")
def enable(
    device_id: DeviceIdArg, credentials: CredentialsOption = False, as_json: JsonOption = False
) -> None:
    """Accept readings from a device again; --credentials gives it a new MQTT login."""
    if credentials:
        _check_login_name(device_id)
    settings = _set_enabled(device_id, True, quiet=as_json)
    passwords = _password_file(settings)
    if credentials:
        _print_password(device_id, _issue_credentials(settings, device_id), as_json)
    elif as_json:
        _print_json({"device_id": device_id, "enabled": True})
    if not credentials and passwords.path.exists() and device_id not in passwords.users():
        say_quietly(
            f"{device_id} has no MQTT login on the secure listener: "
            f"`iotgw devices enable {device_id} --credentials` makes one"
        )


@devices_app.command("disable")
def disable(device_id: DeviceIdArg) -> None:
    """Reject a device's readings (dead letters with reason device_disabled) and revoke its
    MQTT login; keep its record."""
    settings = _set_enabled(device_id, False)
    if _revoke_credentials(settings, device_id):
        console.print(f"revoked the MQTT login of {device_id}")


@devices_app.command("remove")
def remove(device_id: DeviceIdArg) -> None:
    """Remove a device from the registry (a tombstone on iot.devices)."""

    async def work(settings: Settings, registry: DeviceRegistry) -> None:
        _existing(registry, device_id)
        async with RegistryWriter(settings) as writer:
            await writer.remove(device_id)

    _run_with_registry(work)
    console.print(f"removed {device_id}")
    if _revoke_credentials(load_settings(), device_id):
        console.print(f"revoked the MQTT login of {device_id}")


@devices_app.command("import")
def import_csv(
    file: Annotated[
        Path, typer.Argument(help="CSV with the header device_id,type,name,site,room[,tz].")
    ],
    tz: Annotated[
        str | None,
        typer.Option(help="Time zone of the devices whose row names none (e.g. Europe/Berlin)."),
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Import the good rows even if some rows are bad.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Check and report; write nothing.")] = False,
) -> None:
    """Register or update every device of a CSV file; nothing is written if a row is bad."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise IotgwError(f"cannot read {file}: {exc}", exit_code=2) from None
    parsed = parse_devices_csv(
        text, registered_at=now_ms(), catalogue=load_settings().catalogue(), default_tz=tz
    )
    for problem in parsed.errors:
        errors.print(f"{file}: {problem}", highlight=False, markup=False, soft_wrap=True)
    if parsed.errors and not skip_invalid:
        raise IotgwError(
            f"nothing imported: {len(parsed.errors)} bad row(s) in {file}; "
            "fix them or use --skip-invalid",
            exit_code=2,
        )

    async def work(settings: Settings, registry: DeviceRegistry) -> tuple[int, int, int]:
        new, changed, unchanged = [], [], 0
        for device in parsed.devices:
            old = registry.get(device.device_id)
            if old is None:
                new.append(device)
                continue
            # An import updates metadata; it keeps the first registration time and state.
            updated = device.model_copy(
                update={"registered_at": old.registered_at, "enabled": old.enabled}
            )
            if updated == old:
                unchanged += 1
            else:
                changed.append(updated)
        if not dry_run and (new or changed):
            with console.status(f"writing {len(new) + len(changed)} device(s)"):
                async with RegistryWriter(settings) as writer:
                    await writer.put(*new, *changed)
        return len(new), len(changed), unchanged

    new, changed, unchanged = _run_with_registry(work)
    verb = "would register" if dry_run else "registered"
    console.print(
        f"{verb} {new}, {'would update' if dry_run else 'updated'} {changed}, "
        f"unchanged {unchanged}, invalid {len(parsed.errors)}",
        highlight=False,
    )
