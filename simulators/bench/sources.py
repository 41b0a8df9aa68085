"""Benchmark: CPU per message the bridge's validation spends on each device source's format,
next to our envelope's, in one process (no broker, no Kafka).

    python -m simulators.bench.sources --messages 100000

Each format's message is one its firmware sends (as in tests/fixtures/sources/), for a
registered device, judged by `ReadingValidator` as a bridge worker does; the best of three
passes is kept. Prints one JSON object: microseconds per message by format.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

from gateway.domain.pending import PendingBook
from gateway.domain.ratelimit import RateLimiter
from gateway.domain.sources import parse_sources
from gateway.domain.validation import Accepted, ReadingValidator
from gateway.topics import telemetry_topic
from schemas import Device

__all__ = ["measure"]

_DEVICES = 100
_TASMOTA_TZ = "Europe/Berlin"
Message = tuple[str, bytes]


def _messages(now_ms: int) -> dict[str, Callable[[int], Message]]:
    """Each format's message for device number `n`."""
    # Tasmota's `Time`: the plug's local time, without an offset.
    local = datetime.fromtimestamp(now_ms / 1000, ZoneInfo(_TASMOTA_TZ)).strftime(
        "%Y-%m-%dT%H:%M:%S"
    )
    envelope = {"temperature_c": 21.5, "humidity_pct": 40.2, "setpoint_c": 21.0, "heating": True}
    climate = {"battery": 100, "humidity": 44.72, "linkquality": 120, "pressure": 1008.3,
               "temperature": 27.34, "voltage": 3025}  # fmt: skip
    energy = {"TotalStartTime": "2018-11-14T18:39:40", "Total": 6.294, "Yesterday": 5.34,
              "Today": 0.954, "Period": 217, "Power": 235, "ApparentPower": 250,
              "ReactivePower": 82, "Factor": 0.99, "Voltage": 227, "Current": 1.061}  # fmt: skip
    switch = {"id": 0, "apower": 8.9, "voltage": 230.1, "current": 0.05,
              "aenergy": {"total": 1500.5, "by_minute": [1, 2, 3], "minute_ts": 1}}  # fmt: skip

    def dumps(value: object) -> bytes:
        return json.dumps(value).encode()

    return {
        "envelope": lambda n: (
            telemetry_topic(f"thermostat-{n}"),
            dumps({"type": "thermostat", "ts": now_ms, "seq": n, "metrics": envelope}),
        ),
        "zigbee2mqtt": lambda n: (f"zigbee2mqtt/climate-{n}", dumps(climate)),
        "tasmota": lambda n: (f"tele/plug-{n}/SENSOR", dumps({"Time": local, "ENERGY": energy})),
        "shelly": lambda n: (
            f"shelly-{n}/events/rpc",
            dumps(
                {
                    "src": f"shelly-{n}",
                    "method": "NotifyStatus",
                    "params": {"ts": now_ms / 1000, "switch:0": switch},
                }
            ),
        ),
        "homeassistant": lambda n: (f"home/ha-{n}", dumps({"temperature": 21.5})),
    }


def _validator() -> ReadingValidator:
    registry = {}
    for n in range(_DEVICES):
        for device_id, kind, tz in (
            (f"thermostat-{n}", "thermostat", None), (f"climate-{n}", "climate", None),
            (f"plug-{n}", "smart_plug", _TASMOTA_TZ), (f"shelly-{n}", "smart_plug", None),
            (f"ha-{n}", "climate", None),
        ):  # fmt: skip
            registry[device_id] = Device(device_id=device_id, type=kind, tz=tz, registered_at=0)
    sources = parse_sources(
        "sources: [{adapter: zigbee2mqtt}, {adapter: tasmota}, {adapter: shelly},"
        " {adapter: homeassistant}]"
    )
    assert sources.homeassistant is not None
    for n in range(_DEVICES):
        config = {
            "dev_cla": "temperature", "stat_t": f"home/ha-{n}", "unit_of_meas": "°C",
            "val_tpl": "{{ value_json.temperature }}", "dev": {"ids": [f"ha-{n}"]},
        }  # fmt: skip
        topic = f"homeassistant/sensor/ha-{n}/config"
        sources.homeassistant.learn(topic, json.dumps(config).encode())
    return ReadingValidator(
        registry.get,
        require_registration=True,
        max_age_ms=24 * 3600 * 1000,
        limiter=RateLimiter(1e9, 10**9),
        sources=sources,
        pending=PendingBook(),  # as in the bridge: every message is looked up in it
    )


def measure(messages: int) -> dict[str, float]:
    """Microseconds of validation per message, by format (the best of three passes)."""
    now_ms = int(time.time() * 1000)
    validator = _validator()
    results = {}
    for name, make in _messages(now_ms).items():
        batch = [make(n % _DEVICES) for n in range(messages)]
        outcomes = validator.process(*batch[0], now_ms)
        if not all(isinstance(o, Accepted) for o in outcomes):
            raise RuntimeError(f"{name}: the benchmark's message is not accepted: {outcomes}")
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for topic, payload in batch:
                validator.process(topic, payload, now_ms)
            best = min(best, time.perf_counter() - started)
        results[name] = round(best / messages * 1e6, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    json.dump({"us_per_message": measure(args.messages)}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
