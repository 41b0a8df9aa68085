"""Believable signals for every device type, driven by the time of day (pure logic).

Each model keeps its own state and random generator, so a fleet built from one seed
sends the same readings every run. `step(now, dt)` advances the model by `dt` seconds
to the wall-clock time `now` (epoch seconds) and returns its metrics.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from typing import Any

from schemas import DeviceType


def _hour(now: float) -> float:
    """Local hour of day (UTC here: the fleet lives in one time zone)."""
    return (now / 3600) % 24


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def daylight(now: float) -> float:
    """0 at night, up to 1 at noon."""
    return max(0.0, math.sin(math.pi * (_hour(now) - 6) / 12))


def occupancy(now: float) -> float:
    """How likely people are at home and active: mornings and evenings."""
    hour = _hour(now)
    if hour < 6:
        return 0.05
    if hour < 9:
        return 0.7
    if hour < 17:
        return 0.25
    if hour < 23:
        return 0.9
    return 0.3


class DeviceModel(ABC):
    """One device's signal generator."""

    type: DeviceType

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    @abstractmethod
    def step(self, now: float, dt: float) -> dict[str, Any]:
        """Advance `dt` seconds to `now` and return the metrics of a reading."""


class Thermostat(DeviceModel):
    """Room temperature drifts to an ambient that follows the day; heating pushes it up
    whenever it falls half a degree under the setpoint (21 by day, 18 at night)."""

    type = DeviceType.THERMOSTAT

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.temperature = rng.uniform(17, 22)
        self.heating = False

    def step(self, now: float, dt: float) -> dict[str, Any]:
        hour = _hour(now)
        setpoint = 21.0 if 6 <= hour < 22 else 18.0
        ambient = 15 + 4 * daylight(now)
        if self.temperature < setpoint - 0.5:
            self.heating = True
        elif self.temperature > setpoint + 0.5:
            self.heating = False
        drift = (ambient - self.temperature) * 0.0005 * dt
        heat = 0.004 * dt if self.heating else 0.0
        self.temperature = _clamp(
            self.temperature + drift + heat + self.rng.gauss(0, 0.02), -40, 85
        )
        humidity = _clamp(60 - 1.2 * (self.temperature - 15) + self.rng.gauss(0, 1), 0, 100)
        return {
            "temperature_c": round(self.temperature, 2),
            "humidity_pct": round(humidity, 1),
            "setpoint_c": setpoint,
            "heating": self.heating,
        }


class AirQuality(DeviceModel):
    """CO2 rises while the room is occupied and decays toward outdoor air; VOC and fine
    dust follow occupancy (cooking, people)."""

    type = DeviceType.AIR_QUALITY

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.co2 = rng.uniform(420, 700)
        self.occupied = False

    def step(self, now: float, dt: float) -> dict[str, Any]:
        if self.rng.random() < min(1.0, dt / 600):  # people come and go every ~10 minutes
            self.occupied = self.rng.random() < occupancy(now)
        target = 1400.0 if self.occupied else 420.0
        self.co2 = _clamp(self.co2 + (target - self.co2) * min(1.0, 0.002 * dt), 0, 10_000)
        voc = _clamp(80 + (120 if self.occupied else 0) + self.rng.gauss(0, 10), 0, 500)
        pm = _clamp(self.rng.lognormvariate(1.5 + (0.8 if self.occupied else 0), 0.4), 0, 1000)
        return {
            "co2_ppm": round(self.co2 + self.rng.gauss(0, 5), 1),
            "pm2_5_ugm3": round(pm, 1),
            "voc_index": round(voc),
            "temperature_c": round(19 + 3 * daylight(now) + self.rng.gauss(0, 0.2), 2),
            "humidity_pct": round(_clamp(45 + self.rng.gauss(0, 3), 0, 100), 1),
        }


class Motion(DeviceModel):
    """Motion events arrive as a Poisson process whose rate follows occupancy; light
    follows daylight plus lamps in the evening; the battery drains slowly."""

    type = DeviceType.MOTION

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.battery = rng.uniform(60, 100)

    def step(self, now: float, dt: float) -> dict[str, Any]:
        events_per_s = occupancy(now) / 60
        motion = self.rng.random() < 1 - math.exp(-events_per_s * dt)
        lamps = 250.0 if 18 <= _hour(now) < 23 else 0.0
        lux = _clamp(20_000 * daylight(now) + lamps + self.rng.gauss(0, 5), 0, 100_000)
        self.battery = _clamp(self.battery - 0.00001 * dt, 0, 100)
        return {"motion": motion, "lux": round(lux, 1), "battery_pct": round(self.battery, 2)}


class Contact(DeviceModel):
    """A door opens now and then (more often when people are home) and closes after a
    minute or so; sometimes it is left open."""

    type = DeviceType.CONTACT

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.open = False
        self.battery = rng.uniform(60, 100)

    def step(self, now: float, dt: float) -> dict[str, Any]:
        if self.open:
            self.open = self.rng.random() >= 1 - math.exp(-dt / 60)
        else:
            self.open = self.rng.random() < 1 - math.exp(-occupancy(now) * dt / 900)
        self.battery = _clamp(self.battery - 0.00001 * dt, 0, 100)
        return {"open": self.open, "battery_pct": round(self.battery, 2)}


class SmartPlug(DeviceModel):
    """An appliance: a fridge's compressor cycle, or a kettle and a TV used at home hours.
    Voltage wobbles around 230 V; current follows power; energy accumulates."""

    type = DeviceType.SMART_PLUG

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.appliance = rng.choice(["fridge", "kettle", "tv"])
        self.on = False
        self.energy = rng.uniform(0, 500)

    def step(self, now: float, dt: float) -> dict[str, Any]:
        if self.appliance == "fridge":
            self.on = (now % 1800) < 600  # 10 minutes on in every 30
            power = 120.0 if self.on else 2.0
        elif self.appliance == "kettle":
            self.on = self.rng.random() < 0.05 * occupancy(now)
            power = 2200.0 if self.on else 0.5
        else:
            self.on = occupancy(now) > 0.5
            power = 90.0 if self.on else 1.0
        power = _clamp(power * self.rng.uniform(0.95, 1.05), 0, 4000)
        voltage = _clamp(230 + self.rng.gauss(0, 2), 0, 300)
        self.energy += power * dt / 3_600_000
        return {
            "on": self.on,
            "power_w": round(power, 1),
            "voltage_v": round(voltage, 1),
            "current_a": round(_clamp(power / voltage, 0, 20), 3),
            "energy_kwh": round(self.energy, 4),
        }


MODELS: dict[DeviceType, type[DeviceModel]] = {
    model.type: model for model in (Thermostat, AirQuality, Motion, Contact, SmartPlug)
}
