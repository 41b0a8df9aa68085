"""What a simulated device publishes, format by format: our envelope, and what Zigbee2MQTT,
Tasmota and Shelly Gen2 firmware put on MQTT, readings and availability (pure logic).

The payloads follow the projects' own documentation (zigbee2mqtt.io device pages,
tasmota.github.io "JSON Status Responses", the Shelly Gen2 API's `NotifyStatus`): the
fields a real device sends, in its units, including the ones iotgw ignores. Every
payload carries the device's own time, unique per device, so that the loss audit can
find each reading in `iot.readings` without a `seq`:
- Zigbee2MQTT: `last_seen` in epoch milliseconds (its `advanced.last_seen: epoch` option);
- Tasmota: `Time`, whole seconds, local time without an offset (or with it, SetOption52),
  so a Tasmota device sends at most one message a second;
- Shelly: `params.ts`, epoch seconds with the milliseconds as a fraction.

Availability is retained and QoS 1, as the firmwares send it: what a device says on
connecting, and its MQTT last will (`presence`); Zigbee2MQTT's bridge says its own on
`<base_topic>/bridge/state` (`bridge_state`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from gateway.domain.sources import device_id_of
from gateway.topics import status_topic
from schemas import DeviceType, is_device_id

__all__ = [
    "CLOCK_MS",
    "FORMAT_TYPES",
    "Firmware",
    "Format",
    "Presence",
    "bridge_state",
    "is_base_topic",
    "presence",
    "shelly",
    "tasmota_sensor",
    "tasmota_state",
    "tasmota_time",
    "zigbee2mqtt",
]

Payload = tuple[str, dict[str, Any]]
# An availability message: its topic and payload (published retained, QoS 1).
Presence = tuple[str, bytes]


class Format(StrEnum):
    """The language a simulated device speaks on MQTT."""

    ENVELOPE = "envelope"
    ZIGBEE2MQTT = "zigbee2mqtt"
    TASMOTA = "tasmota"
    SHELLY = "shelly"


# The device types each format can play: a Tasmota or Shelly device is a plug or a room
# sensor; Zigbee2MQTT has a device for every type.
FORMAT_TYPES: dict[Format, tuple[DeviceType, ...]] = {
    Format.ENVELOPE: tuple(DeviceType),
    Format.ZIGBEE2MQTT: tuple(DeviceType),
    Format.TASMOTA: (DeviceType.SMART_PLUG, DeviceType.CLIMATE),
    Format.SHELLY: (DeviceType.SMART_PLUG, DeviceType.CLIMATE),
}

# The resolution of each format's device time, in milliseconds.
CLOCK_MS: dict[Format, int] = {
    Format.ENVELOPE: 1,
    Format.ZIGBEE2MQTT: 1,
    Format.TASMOTA: 1000,
    Format.SHELLY: 1,
}

_BASE_TOPIC = re.compile(r"^[^+#/\x00]+(/[^+#/\x00]+)*$")


def is_base_topic(topic: str) -> bool:
    """A Zigbee2MQTT base topic: MQTT levels, no wildcard, no empty level."""
    return _BASE_TOPIC.fullmatch(topic) is not None


@dataclass(frozen=True, slots=True)
class Firmware:
    """How one device speaks: its format, its id on the wire, and the settings of its
    firmware that show in what it sends."""

    format: Format
    native_id: str
    # Zigbee2MQTT: `base_topic` of its configuration.
    base_topic: str = "zigbee2mqtt"
    # Zigbee2MQTT 1.x sends a raw `illuminance` and `illuminance_lux`; 2.x lux in `illuminance`.
    z2m_v1: bool = False
    # Tasmota: the climate sensor's name (AM2301: temperature and humidity; BME280: and
    # pressure), the temperature unit (SetOption8), the clock's zone and SetOption52
    # (an offset in `Time`).
    sensor: str = "AM2301"
    temp_unit: str = "C"
    tz: str = "UTC"
    set_option52: bool = False

    def __post_init__(self) -> None:
        if not is_device_id(self.device_id):
            raise ValueError(f"native id {self.native_id!r} gives no valid device id")
        if not is_base_topic(self.base_topic):
            raise ValueError(f"base topic {self.base_topic!r}: MQTT levels without wildcards")
        if self.temp_unit not in ("C", "F"):
            raise ValueError("temp_unit is C or F")
        if self.sensor not in ("AM2301", "BME280"):
            raise ValueError("sensor is AM2301 or BME280")
        ZoneInfo(self.tz)

    @property
    def device_id(self) -> str:
        return device_id_of(self.native_id)


def _battery_mv(battery_pct: float) -> int:
    """A CR2032 cell's voltage in millivolts (Aqara sensors report it as `voltage`)."""
    return round(2700 + 3.2 * battery_pct)


def zigbee2mqtt(firmware: Firmware, device_type: str, metrics: dict[str, Any],
                ts_ms: int, rng: random.Random) -> Payload:  # fmt: skip
    """`<base_topic>/<friendly_name>`: the device's whole state as Zigbee2MQTT publishes
    it, with `last_seen` in epoch milliseconds."""
    m = metrics
    state: dict[str, Any]
    if device_type == DeviceType.CLIMATE:  # Aqara WSDCGQ11LM
        state = {
            "battery": round(m["battery_pct"]),
            "humidity": m["humidity_pct"],
            "pressure": m["pressure_hpa"],
            "temperature": m["temperature_c"],
            "voltage": _battery_mv(m["battery_pct"]),
        }
    elif device_type == DeviceType.MOTION:  # Aqara RTCGQ11LM
        state = {
            "battery": round(m["battery_pct"]),
            "device_temperature": rng.randint(18, 26),
            "occupancy": m["motion"],
            "power_outage_count": 3,
            "voltage": _battery_mv(m["battery_pct"]),
        }
        if firmware.z2m_v1:
            # 1.x: the raw ZCL value (10,000 * log10(lux) + 1) next to the lux.
            state["illuminance"] = round(10_000 * math.log10(m["lux"] + 1) + 1)
            state["illuminance_lux"] = round(m["lux"])
        else:
            state["illuminance"] = round(m["lux"])
    elif device_type == DeviceType.CONTACT:  # Aqara MCCGQ11LM: `contact: true` is closed
        state = {
            "battery": round(m["battery_pct"]),
            "contact": not m["open"],
            "device_temperature": rng.randint(18, 26),
            "power_outage_count": 1,
            "voltage": _battery_mv(m["battery_pct"]),
        }
    elif device_type == DeviceType.SMART_PLUG:  # TuYa TS011F_plug_1
        state = {
            "child_lock": "UNLOCK",
            "current": m["current_a"],
            "energy": round(m["energy_kwh"], 2),
            "indicator_mode": "off/on",
            "power": round(m["power_w"]),
            "power_outage_memory": "restore",
            "state": "ON" if m["on"] else "OFF",
            "voltage": round(m["voltage_v"]),
        }
    elif device_type == DeviceType.THERMOSTAT:  # Danfoss 014G2461 (a radiator valve)
        state = {
            "battery": 87,
            "local_temperature": m["temperature_c"],
            "occupied_heating_setpoint": m["setpoint_c"],
            "running_state": "heat" if m["heating"] else "idle",
            "system_mode": "heat",
        }
    else:  # an air quality sensor (Sensirion SEN5x based)
        state = {
            "co2": round(m["co2_ppm"]),
            "humidity": m["humidity_pct"],
            "pm25": m["pm2_5_ugm3"],
            "temperature": m["temperature_c"],
            "voc_index": m["voc_index"],
        }
    state["linkquality"] = rng.randint(40, 255)
    state["last_seen"] = ts_ms
    return f"{firmware.base_topic}/{firmware.native_id}", dict(sorted(state.items()))


def tasmota_time(firmware: Firmware, ts_ms: int) -> str:
    """Tasmota's `Time`: the local time of the device's zone, without an offset unless
    SetOption52 is on.

    In the hour the clocks go back the same local time happens twice, so a device without
    SetOption52 sends one text for two instants, and InfluxDB would keep one point of the
    two; the simulated device sends the offset then, so that its audit stays exact.
    """
    local = datetime.fromtimestamp(ts_ms // 1000, ZoneInfo(firmware.tz))
    ambiguous = local.replace(fold=0).utcoffset() != local.replace(fold=1).utcoffset()
    if firmware.set_option52 or ambiguous:
        return local.isoformat(timespec="seconds")
    return local.replace(tzinfo=None).isoformat(timespec="seconds")


def _uptime(seconds: int) -> str:
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    return f"{days}T{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _dew_point(temperature_c: float, humidity_pct: float) -> float:
    """Magnus formula, as Tasmota computes `DewPoint`."""
    gamma = math.log(max(humidity_pct, 0.1) / 100) + 17.62 * temperature_c / (
        243.12 + temperature_c
    )
    # Far outside the formula's range (a faulty sensor's reading), the temperature itself.
    return 243.12 * gamma / (17.62 - gamma) if gamma < 17.5 else temperature_c


def tasmota_sensor(firmware: Firmware, device_type: str, metrics: dict[str, Any],
                   ts_ms: int) -> Payload:  # fmt: skip
    """`tele/<topic>/SENSOR`: the energy monitor of a plug, or a climate sensor's block."""
    m = metrics
    payload: dict[str, Any] = {"Time": tasmota_time(firmware, ts_ms)}
    if device_type == DeviceType.SMART_PLUG:
        power = m["power_w"]
        apparent = power / 0.95
        payload["ENERGY"] = {
            "TotalStartTime": "2025-03-14T09:21:07",
            "Total": round(m["energy_kwh"], 3),
            "Yesterday": 1.234,
            "Today": round(m["energy_kwh"] % 1, 3),
            "Period": round(power / 60),
            "Power": round(power),
            "ApparentPower": round(apparent),
            "ReactivePower": round(math.sqrt(max(apparent**2 - power**2, 0))),
            "Factor": 0.95 if power else 0.0,
            "Voltage": round(m["voltage_v"]),
            "Current": round(m["current_a"], 3),
        }
    elif device_type == DeviceType.CLIMATE:
        celsius, humidity = m["temperature_c"], m["humidity_pct"]
        dew = _dew_point(celsius, humidity)
        if firmware.temp_unit == "F":
            celsius, dew = celsius * 9 / 5 + 32, dew * 9 / 5 + 32
        block = {
            "Temperature": round(celsius, 1),
            "Humidity": round(humidity, 1),
            "DewPoint": round(dew, 1),
        }
        if firmware.sensor == "BME280":
            block["Pressure"] = round(m["pressure_hpa"], 1)
        payload[firmware.sensor] = block
        if firmware.sensor == "BME280":
            payload["PressureUnit"] = "hPa"
        payload["TempUnit"] = firmware.temp_unit
    else:
        raise ValueError(f"a Tasmota device does not play {device_type}")
    return f"tele/{firmware.native_id}/SENSOR", payload


def tasmota_state(firmware: Firmware, on: bool, ts_ms: int, rng: random.Random) -> Payload:
    """`tele/<topic>/STATE`: the relay's `POWER` and the device's health."""
    uptime = (ts_ms // 1000) % (9 * 86_400)  # as if it restarted every nine days
    signal = rng.randint(-80, -45)
    return f"tele/{firmware.native_id}/STATE", {
        "Time": tasmota_time(firmware, ts_ms),
        "Uptime": _uptime(uptime),
        "UptimeSec": uptime,
        "Heap": 26,
        "SleepMode": "Dynamic",
        "Sleep": 50,
        "LoadAvg": 19,
        "MqttCount": 1,
        "POWER": "ON" if on else "OFF",
        "Wifi": {
            "AP": 1,
            "SSId": "home",
            "BSSId": "30:B5:C2:5D:70:72",
            "Channel": 6,
            "Mode": "11n",
            "RSSI": min(100, 2 * (signal + 100)),
            "Signal": signal,
            "LinkCount": 1,
            "Downtime": "0T00:00:03",
        },
    }


def shelly(firmware: Firmware, device_type: str, metrics: dict[str, Any],
           ts_ms: int) -> Payload:  # fmt: skip
    """`<id>/events/rpc`: a plug's `NotifyStatus` of `switch:0` (energy in Wh), or a
    Plus H&T's `NotifyFullStatus` on waking up (temperature, humidity, battery)."""
    m = metrics
    params: dict[str, Any] = {"ts": ts_ms / 1000}
    if device_type == DeviceType.SMART_PLUG:
        method = "NotifyStatus"
        wh = m["energy_kwh"] * 1000
        params["switch:0"] = {
            "id": 0,
            "output": m["on"],
            "apower": m["power_w"],
            "voltage": m["voltage_v"],
            "freq": 50.0,
            "current": m["current_a"],
            "aenergy": {
                "total": round(wh, 3),
                "by_minute": [round(m["power_w"] / 60 * 1000, 3), 0.0, 0.0],
                "minute_ts": ts_ms // 60_000 * 60,
            },
            "temperature": {"tC": 41.2, "tF": 106.2},
        }
    elif device_type == DeviceType.CLIMATE:
        method = "NotifyFullStatus"
        celsius = m["temperature_c"]
        params |= {
            "ble": {},
            "cloud": {"connected": False},
            "devicepower:0": {
                "id": 0,
                "battery": {
                    "V": round(4.4 + m["battery_pct"] / 60, 2),
                    "percent": round(m["battery_pct"]),
                },
                "external": {"present": False},
            },
            "ht_ui": {},
            "humidity:0": {"id": 0, "rh": round(m["humidity_pct"], 1)},
            "mqtt": {"connected": True},
            "sys": {
                "mac": firmware.native_id.rpartition("-")[2].upper(),
                "restart_required": False,
                "unixtime": ts_ms // 1000,
                "uptime": 2,
                "wakeup_reason": {"boot": "deepsleep_wake", "cause": "periodic"},
            },
            "temperature:0": {
                "id": 0,
                "tC": round(celsius, 1),
                "tF": round(celsius * 9 / 5 + 32, 1),
            },
            "wifi": {"sta_ip": "192.168.1.64", "status": "got ip", "ssid": "home", "rssi": -58},
            "ws": {"connected": False},
        }
    else:
        raise ValueError(f"a Shelly device does not play {device_type}")
    return f"{firmware.native_id}/events/rpc", {
        "src": firmware.native_id,
        "dst": f"{firmware.native_id}/events",
        "method": method,
        "params": params,
    }


def presence(firmware: Firmware, online: bool) -> Presence:
    """Where and how a device's firmware says it is online (on each connect) or offline
    (its last will; for Zigbee2MQTT, its availability check):
    - our envelope: `devices/{id}/status`, `online` / `offline`;
    - Tasmota: `tele/<topic>/LWT`, `Online` / `Offline`;
    - Shelly Gen2: `<id>/online`, `true` / `false`;
    - Zigbee2MQTT: `<base_topic>/<name>/availability`, `{"state":"online"}` (1.x with its
      default `legacy_availability_payload`: plain `online`)."""
    if firmware.format is Format.TASMOTA:
        return f"tele/{firmware.native_id}/LWT", b"Online" if online else b"Offline"
    if firmware.format is Format.SHELLY:
        return f"{firmware.native_id}/online", b"true" if online else b"false"
    word = b"online" if online else b"offline"
    if firmware.format is Format.ZIGBEE2MQTT:
        payload = word if firmware.z2m_v1 else b'{"state":"' + word + b'"}'
        return f"{firmware.base_topic}/{firmware.native_id}/availability", payload
    return status_topic(firmware.device_id), word


def bridge_state(base_topic: str, online: bool) -> Presence:
    """`<base_topic>/bridge/state`: Zigbee2MQTT's own availability (its last will offline)."""
    return f"{base_topic}/bridge/state", b'{"state":"online"}' if online else b'{"state":"offline"}'
