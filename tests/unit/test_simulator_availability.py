"""What the simulated devices say of their availability, in each firmware's words, which
MQTT connection holds whose last will, and the drop fault (pure parts, no broker)."""

from __future__ import annotations

import json

import pytest
from gmqtt import Message as MqttMessage
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.package import PublishPacket
from gmqtt.mqtt.utils import IdGenerator

from gateway.domain.ratelimit import RateLimiter
from gateway.domain.sources import load_sources
from gateway.domain.validation import Accepted, ReadingValidator
from gateway.domain.validation import Presence as PresenceOutcome
from simulators.demo import DEMO_SOURCES
from simulators.fleet import (
    DROP_S,
    FleetTraffic,
    SimDevice,
    UplinkKind,
    build_fleet,
    plan_uplinks,
)
from simulators.formats import Firmware, Format, bridge_state, presence
from simulators.simulate import _Outbox

DAY_START = 1_795_996_800.0  # 2026-11-30T00:00:00Z


def _validator(fleet: list[SimDevice]) -> ReadingValidator:
    """The bridge's judge, reading the demo's sources, with the fleet registered."""
    registry = {d.device_id: d.record() for d in fleet}
    return ReadingValidator(
        registry.get,
        require_registration=True,
        max_age_ms=86_400_000,
        limiter=RateLimiter(1e9, 1e9),
        sources=load_sources(DEMO_SOURCES),
    )


def test_each_format_says_online_and_offline_in_its_firmwares_words() -> None:
    """Envelope devices/ID/status online|offline, Tasmota tele/T/LWT Online|Offline, Shelly
    ID/online true|false, Zigbee2MQTT BASE/NAME/availability {"state":...} (1.x: plain)."""
    said = {
        fmt: (presence(firmware, True), presence(firmware, False))
        for fmt, firmware in [
            ("envelope", Firmware(Format.ENVELOPE, "thermo-1")),
            ("tasmota", Firmware(Format.TASMOTA, "tasmota_A1B2C3")),
            ("shelly", Firmware(Format.SHELLY, "shellyplusplugs-a1b2c3d4e5f6")),
            ("z2m", Firmware(Format.ZIGBEE2MQTT, "hall/climate", base_topic="zb")),
            ("z2m 1.x", Firmware(Format.ZIGBEE2MQTT, "hall/door", base_topic="zb", z2m_v1=True)),
        ]
    }
    assert said == {
        "envelope": (("devices/thermo-1/status", b"online"),
                     ("devices/thermo-1/status", b"offline")),
        "tasmota": (("tele/tasmota_A1B2C3/LWT", b"Online"),
                    ("tele/tasmota_A1B2C3/LWT", b"Offline")),
        "shelly": (("shellyplusplugs-a1b2c3d4e5f6/online", b"true"),
                   ("shellyplusplugs-a1b2c3d4e5f6/online", b"false")),
        "z2m": (("zb/hall/climate/availability", b'{"state":"online"}'),
                ("zb/hall/climate/availability", b'{"state":"offline"}')),
        "z2m 1.x": (("zb/hall/door/availability", b"online"),
                    ("zb/hall/door/availability", b"offline")),
    }  # fmt: skip
    assert bridge_state("zb", False) == ("zb/bridge/state", b'{"state":"offline"}')


@pytest.mark.parametrize("online", [True, False])
def test_the_bridge_reads_every_devices_availability_as_its_own(online: bool) -> None:
    """Through the bridge's own validation and the demo's sources, each device of the mixed
    fleet's availability message is a record of its device, state and format; Zigbee2MQTT's
    bridge state is no device's."""
    fleet = build_fleet(30, 4, "mixed")
    validator = _validator(fleet)
    for device in fleet:
        topic, payload = presence(device.firmware, online)
        [outcome] = validator.process(topic, payload, 1_000)
        assert isinstance(outcome, PresenceOutcome), (topic, payload)
        assert json.loads(outcome.value) == {
            "device_id": device.device_id, "online": online, "ts": 1_000,
            "source": device.format.value,
        }  # fmt: skip
    assert validator.process(*bridge_state("zigbee2mqtt", online), 1_000) == []


def test_devices_get_a_connection_and_will_of_their_own_up_to_the_limit() -> None:
    """Past the limit devices share connections without a will; Zigbee2MQTT's devices share
    its one connection, whose will is its bridge state; each device is on one connection."""
    fleet = build_fleet(40, 2, "mixed")  # 16 Zigbee devices, 24 that connect themselves
    uplinks = plan_uplinks(fleet, own=10, shared=4)
    kinds = [u.kind for u in uplinks]
    assert kinds == [UplinkKind.OWN] * 10 + [UplinkKind.ZIGBEE2MQTT] + [UplinkKind.SHARED] * 4
    placed = [d.device_id for u in uplinks for d in u.devices]
    assert sorted(placed) == sorted(d.device_id for d in fleet)
    for uplink in uplinks[:10]:
        [device] = uplink.devices
        assert device.format is not Format.ZIGBEE2MQTT
        assert uplink.will == presence(device.firmware, False)
    zigbee = uplinks[10]
    assert {d.format for d in zigbee.devices} == {Format.ZIGBEE2MQTT}
    assert len(zigbee.devices) == 16
    assert zigbee.will == bridge_state("zigbee2mqtt", False)
    assert [len(u.devices) for u in uplinks[11:]] == [4, 4, 3, 3]
    assert all(u.will is None for u in uplinks[11:])


def test_zigbee2mqtt_says_its_bridge_state_around_its_devices_and_skips_those_away() -> None:
    """On connect: bridge online first, then each device not away; at a clean stop each
    device not away offline, then the bridge offline last."""
    fleet = build_fleet(3, 5, "zigbee2mqtt", base_topic="zb")
    [uplink] = plan_uplinks(fleet)
    away = {fleet[1].device_id}
    assert uplink.hello(away) == [
        ("zb/bridge/state", b'{"state":"online"}'),
        presence(fleet[0].firmware, True),
        presence(fleet[2].firmware, True),
    ]
    assert uplink.goodbye(away) == [
        presence(fleet[0].firmware, False),
        presence(fleet[2].firmware, False),
        ("zb/bridge/state", b'{"state":"offline"}'),
    ]


@pytest.mark.parametrize("fmt", ["envelope", "zigbee2mqtt", "tasmota", "shelly"])
def test_a_dropping_device_sends_its_reading_then_is_silent_until_it_is_back(fmt: str) -> None:
    """The drop fault's reading goes out, valid and logged as `drop`; the device then sends
    nothing for DROP_S seconds, and afterwards sends again."""
    [device] = build_fleet(1, 6, fmt)
    traffic = FleetTraffic([device], {"drop": 1.0}, 6)
    now = DAY_START + 10 * 3600
    [message] = traffic.messages(device, now)
    assert [r.fault for r in message.readings] == ["drop"]
    [outcome] = _validator([device]).process(message.topic, message.payload, int(now * 1000))
    assert isinstance(outcome, Accepted)
    away_s = device.offline_until - now
    assert DROP_S[0] <= away_s <= DROP_S[1]
    assert traffic.messages(device, now + away_s - 0.5) == []
    traffic.faults = {}
    assert len(traffic.messages(device, now + away_s + 1)) == 1


def test_orphaned_availability_is_published_again_retained() -> None:
    """A message a lost session dropped comes back with its topic, payload and RETAIN flag
    (availability stays retained; readings stay not)."""

    class Protocol:
        proto_ver = MQTTv50
        id_generator = IdGenerator()

    outbox = _Outbox()
    for number, (topic, payload, retain) in enumerate(
        [("tele/tasmota_A1B2C3/LWT", b"Online", True), ("devices/t-1/telemetry", b"{}", False)]
    ):
        _, packet = PublishPacket.build_package(
            MqttMessage(topic, payload, qos=1, retain=retain), Protocol
        )
        outbox.push_message(number + 1, packet)
    outbox.clear()
    assert outbox.orphans == [
        ("tele/tasmota_A1B2C3/LWT", b"Online", True),
        ("devices/t-1/telemetry", b"{}", False),
    ]
