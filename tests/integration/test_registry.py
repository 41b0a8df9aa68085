"""The device registry on Kafka: a live view, and the `iotgw devices` commands that change it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from typer.testing import CliRunner, Result

from gateway.adapters.kafka import ensure_topics, kafka_admin
from gateway.cli.app import app
from gateway.domain.devices_file import build_device
from gateway.services.registry import DeviceRegistry, RegistryWriter
from gateway.settings import Settings
from gateway.topics import Topics
from tests.conftest import unique
from tests.support import until

pytestmark = pytest.mark.integration

T0 = 1_795_680_000_000


@pytest.fixture
async def registry_settings(settings: Settings) -> Settings:
    """Settings with a topic prefix of this test's own, its topics created."""
    own = settings.model_copy(update={"topic_prefix": unique("reg").replace("-", "")})
    await ensure_topics(own)
    return own


def env_of(settings: Settings) -> dict[str, str]:
    return {
        "IOTGW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "IOTGW_TOPIC_PREFIX": settings.topic_prefix,
    }


async def iotgw(settings: Settings, *args: str) -> Result:
    """Run `iotgw ARGS` through typer's runner (in a thread: the command runs its own loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env_of(settings))


async def test_registry_is_ready_only_with_everything_loaded(registry_settings: Settings) -> None:
    """After start() returns, every device written before is there, updates and removals applied."""
    devices = [build_device(f"d{i}", "motion", registered_at=T0) for i in range(500)]
    async with RegistryWriter(registry_settings) as writer:
        await writer.put(*devices)
        await writer.put(devices[7].model_copy(update={"room": "hall", "enabled": False}))
        await writer.remove("d8")
    async with DeviceRegistry(registry_settings) as registry:
        assert registry.ready.is_set()
        assert len(registry) == 499
        assert "d8" not in registry
        d7 = registry.get("d7")
        assert d7 is not None
        assert (d7.room, d7.enabled) == ("hall", False)


async def test_registration_reaches_a_live_registry_within_a_second(
    registry_settings: Settings,
) -> None:
    """A device registered with the CLI is seen by an already running registry within 1 s."""
    async with DeviceRegistry(registry_settings) as registry:
        result = await iotgw(
            registry_settings, "devices", "register", "thermo-kitchen", "--type", "thermostat",
            "--name", "Kitchen", "--site", "home", "--room", "kitchen",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert "registered thermo-kitchen" in result.stdout
        await until(lambda: "thermo-kitchen" in registry, 1.0)
        device = registry.get("thermo-kitchen")
        assert device is not None
        assert (device.type, device.name, device.site, device.room, device.enabled) == (
            "thermostat", "Kitchen", "home", "kitchen", True,
        )  # fmt: skip


async def test_each_command_changes_what_a_live_registry_sees(registry_settings: Settings) -> None:
    """update, disable, enable and remove each reach a running registry."""
    s = registry_settings
    async with DeviceRegistry(s) as registry:

        def field(name: str) -> object:
            device = registry.get("plug-1")
            return None if device is None else getattr(device, name)

        assert (
            await iotgw(s, "devices", "register", "plug-1", "--type", "smart_plug")
        ).exit_code == 0
        await until(lambda: field("enabled") is True, 1.0)
        registered_at = field("registered_at")

        updated = await iotgw(
            s,
            "devices",
            "register",
            "plug-1",
            "--type",
            "smart_plug",
            "--room",
            "garage",
            "--update",
        )
        assert updated.exit_code == 0, updated.stderr
        await until(lambda: field("room") == "garage", 1.0)
        assert field("registered_at") == registered_at

        assert (await iotgw(s, "devices", "disable", "plug-1")).exit_code == 0
        await until(lambda: field("enabled") is False, 1.0)
        again = await iotgw(s, "devices", "disable", "plug-1")
        assert "already disabled" in again.stdout

        assert (await iotgw(s, "devices", "enable", "plug-1")).exit_code == 0
        await until(lambda: field("enabled") is True, 1.0)

        assert (await iotgw(s, "devices", "remove", "plug-1")).exit_code == 0
        await until(lambda: "plug-1" not in registry, 1.0)

    async with DeviceRegistry(s) as fresh:
        assert "plug-1" not in fresh


async def test_registering_twice_needs_update(registry_settings: Settings) -> None:
    """A second register of the same id fails with one line and exit 1, changing nothing."""
    s = registry_settings
    assert (await iotgw(s, "devices", "register", "c1", "--type", "contact")).exit_code == 0
    second = await iotgw(s, "devices", "register", "c1", "--type", "motion")
    assert second.exit_code == 1
    assert second.stderr.strip() == (
        "iotgw: error: device c1 is already registered; use --update to change it"
    )
    shown = await iotgw(s, "devices", "show", "c1", "--json")
    assert json.loads(shown.stdout)["type"] == "contact"


async def test_list_filters_by_type_and_site(registry_settings: Settings) -> None:
    """`list --json` prints every device, sorted; --type and --site narrow it down."""
    s = registry_settings
    for args in (
        ["t2", "--type", "thermostat", "--site", "flat"],
        ["t1", "--type", "thermostat", "--site", "house"],
        ["m1", "--type", "motion", "--site", "house"],
    ):
        assert (await iotgw(s, "devices", "register", *args)).exit_code == 0

    async def ids(*options: str) -> list[str]:
        result = await iotgw(s, "devices", "list", "--json", *options)
        assert result.exit_code == 0, result.stderr
        return [d["device_id"] for d in json.loads(result.stdout)]

    assert await ids() == ["m1", "t1", "t2"]
    assert await ids("--type", "thermostat") == ["t1", "t2"]
    assert await ids("--site", "house") == ["m1", "t1"]
    assert await ids("--type", "thermostat", "--site", "house") == ["t1"]
    table = await iotgw(s, "devices", "list")
    assert "3 device(s)" in table.stdout


async def test_show_and_remove_of_unknown_device_fail(registry_settings: Settings) -> None:
    """Commands on a device that is not registered say so in one line and exit 1."""
    for command in ("show", "enable", "disable", "remove"):
        result = await iotgw(registry_settings, "devices", command, "ghost")
        assert result.exit_code == 1
        assert result.stderr.strip() == "iotgw: error: device ghost is not registered"


async def test_registry_topic_is_compacted(registry_settings: Settings) -> None:
    """iot.devices keeps the last record per device forever: cleanup.policy=compact."""
    topic = Topics(registry_settings.topic_prefix).devices
    async with kafka_admin(registry_settings.kafka_bootstrap, 10) as admin:
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": None})]
        )
    assert configs[0].resources[0][4][0][1] == "compact"


async def registry_end_offset(settings: Settings) -> int:
    """How many records the registry topic has ever received."""
    partition = TopicPartition(Topics(settings.topic_prefix).devices, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        return int((await consumer.end_offsets([partition]))[partition])
    finally:
        await consumer.stop()


async def test_csv_import_writes_nothing_while_a_row_is_bad(
    registry_settings: Settings, tmp_path: Path
) -> None:
    """Bad rows are listed with line numbers and nothing is written; --dry-run writes
    nothing either; --skip-invalid imports the good rows; a re-import updates in place."""
    s = registry_settings
    csv_file = tmp_path / "devices.csv"
    csv_file.write_text(
        "device_id,type,name,site,room\n"
        "k1,thermostat,Kitchen,home,kitchen\n"
        "bad id,motion,,home,hall\n"
        "k2,smart_plug,Kettle,home,kitchen\n"
        "k3,fridge,,home,kitchen\n"
    )
    refused = await iotgw(s, "devices", "import", str(csv_file))
    assert refused.exit_code == 2
    assert f"{csv_file}: line 3: invalid device id 'bad id'" in refused.stderr
    assert f"{csv_file}: line 5: unknown device type 'fridge'" in refused.stderr
    assert "nothing imported: 2 bad row(s)" in refused.stderr

    dry = await iotgw(s, "devices", "import", str(csv_file), "--skip-invalid", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "would register 2, would update 0, unchanged 0, invalid 2" in dry.stdout
    assert await registry_end_offset(s) == 0

    imported = await iotgw(s, "devices", "import", str(csv_file), "--skip-invalid")
    assert imported.exit_code == 0, imported.stderr
    assert "registered 2, updated 0, unchanged 0, invalid 2" in imported.stdout

    csv_file.write_text("device_id,type,room\nk1,thermostat,pantry\nk2,smart_plug,kitchen\n")
    again = await iotgw(s, "devices", "import", str(csv_file))
    assert "registered 0, updated 2, unchanged 0" in again.stdout
    async with DeviceRegistry(s) as registry:
        k1, k2 = registry.get("k1"), registry.get("k2")
        assert k1 is not None
        assert k2 is not None
        assert (k1.room, k1.name, k2.room) == ("pantry", None, "kitchen")


def run_subprocess(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env_of(settings), **env},
    )


def test_register_and_list_as_a_subprocess(registry_settings: Settings) -> None:
    """The installed command line: register, then list --json, in separate processes."""
    s = registry_settings
    done = run_subprocess(
        s, "devices", "register", "aq-1", "--type", "air_quality", "--site", "lab"
    )
    assert done.returncode == 0, done.stderr
    listed = run_subprocess(s, "devices", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [device] = json.loads(listed.stdout)
    assert (device["device_id"], device["type"], device["site"]) == ("aq-1", "air_quality", "lab")


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["show", "d1"],
        ["register", "d1", "--type", "motion"],
        ["enable", "d1"],
        ["disable", "d1"],
        ["remove", "d1"],
    ],
)
def test_every_command_fails_in_one_line_without_kafka(
    registry_settings: Settings, args: list[str]
) -> None:
    """With Kafka unreachable each command prints one line and exits 1 within its timeout."""
    started = time.monotonic()
    result = run_subprocess(
        registry_settings,
        "devices",
        *args,
        IOTGW_KAFKA_BOOTSTRAP="127.0.0.1:1",
        IOTGW_TIMEOUT_S="2",
    )
    assert result.returncode == 1
    assert result.stderr.startswith("iotgw: error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "127.0.0.1:1" in result.stderr
    # Generous: start-up of Python plus the 2 s timeout; the point is that it never hangs.
    assert time.monotonic() - started < 15
