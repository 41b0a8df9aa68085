"""InfluxDB with authentication: the writer logs in with the credentials of its settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from devstack import stack
from gateway.adapters.influx import InfluxClient
from gateway.adapters.kafka import produce
from gateway.clock import now_ms
from gateway.errors import IotgwError
from gateway.settings import Settings
from gateway.topics import Topics
from simulators.processes import free_ports
from tests.conftest import unique
from tests.support import canonical, own_settings, running_writer, until_points

pytestmark = pytest.mark.integration


async def test_writer_logs_in_to_influxdb_with_its_settings(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With authentication on, a writer whose user may write (not administer) the database
    writes every point; a wrong password stops it with one line that does not echo it."""
    plan = stack.StackPlan(
        tmp_path / "influx", influx_port=free_ports(1, step=2), kinds=("influxdb",)
    )
    admin, writer = unique("admin-pw"), unique("writer-pw")
    db = unique("db").replace("-", "_")
    await stack.up(plan, settings)
    try:
        async with InfluxClient(plan.influx_url) as influx:
            for statement in (
                f"CREATE USER \"admin\" WITH PASSWORD '{admin}' WITH ALL PRIVILEGES",
                f'CREATE DATABASE "{db}"',
                f"CREATE USER \"writer\" WITH PASSWORD '{writer}'",
                f'GRANT ALL ON "{db}" TO "writer"',
            ):
                await influx.query(statement, method="POST")
        stack.down(plan.root)
        # The servers of the stack inherit this environment: InfluxDB now requires a login.
        monkeypatch.setenv("INFLUXDB_HTTP_AUTH_ENABLED", "true")
        as_admin = {"influx_username": "admin", "influx_password": SecretStr(admin)}
        await stack.up(plan, settings.model_copy(update=as_admin))

        own = await own_settings(settings, writer_flush_interval_s=0.2)
        s = own.model_copy(
            update={
                "influx_url": plan.influx_url,
                "influx_db": db,
                "influx_username": "writer",
                "influx_password": SecretStr(writer),
            }
        )
        device, t0 = unique("thermo"), now_ms() - 60_000
        readings = [
            (device.encode(), canonical(device, "thermostat", i, t0 + i, temperature_c=21.0))
            for i in range(100)
        ]
        await produce(s, Topics(s.topic_prefix).readings, readings)
        async with running_writer(s):
            await until_points(s, "thermostat", 100)

        wrong = s.model_copy(update={"influx_password": SecretStr(writer + "x")})
        with pytest.raises(IotgwError, match="InfluxDB refused") as refused:
            async with running_writer(wrong):
                pass
        assert writer not in str(refused.value)
    finally:
        stack.down(plan.root, purge=True)
