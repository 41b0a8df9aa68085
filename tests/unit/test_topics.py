"""Topic names: one place, prefix configurable."""

from __future__ import annotations

import pytest

from gateway.topics import Topics

pytestmark = pytest.mark.unit


def test_default_names_follow_design() -> None:
    """The default prefix gives the topic names of DESIGN.md."""
    topics = Topics()
    assert [topics.readings, topics.dead_letters, topics.devices, topics.alerts] == [
        "iot.readings",
        "iot.readings.dlq",
        "iot.devices",
        "iot.alerts",
    ]


def test_prefix_changes_every_name() -> None:
    """A custom prefix is applied to every topic."""
    names = [spec.name for spec in Topics("home").specs()]
    assert names == [
        "home.readings", "home.readings.dlq", "home.devices", "home.alerts", "home.rules.state",
        "home.readings.pending", "home.availability", "home.devices.state",
    ]  # fmt: skip


def test_registry_topic_is_compacted_and_readings_partitioned() -> None:
    """iot.devices is compacted; readings take the configured partition count."""
    specs = {spec.name: spec for spec in Topics().specs(readings_partitions=12)}
    assert specs["iot.devices"].configs == {"cleanup.policy": "compact"}
    assert specs["iot.rules.state"].configs == {"cleanup.policy": "compact"}
    assert specs["iot.readings"].partitions == 12
    assert specs["iot.devices.state"].configs == {"cleanup.policy": "compact"}


def test_pending_topic_keeps_held_readings_a_week_past_their_maximum_age() -> None:
    """Held readings outlive IOTGW_PENDING_MAX_AGE_S in Kafka by a week, to be dead-lettered."""
    specs = {spec.name: spec for spec in Topics().specs(pending_max_age_s=3600)}
    assert specs["iot.readings.pending"].configs == {"retention.ms": str(169 * 3600 * 1000)}


@pytest.mark.parametrize("prefix", ["", "bad prefix", "iot/x", "ü"])
def test_invalid_prefix_is_refused(prefix: str) -> None:
    """Kafka topic names allow only letters, digits, dot, underscore and dash."""
    with pytest.raises(ValueError, match="invalid topic prefix"):
        Topics(prefix)
