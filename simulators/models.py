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
from schemas.types import TypeCatalogue, TypeSpec


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

    type: str

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


class Climate(DeviceModel):
    """A battery room sensor: temperature follows the day and the heating of the house,
    humidity moves against it (and jumps when someone showers or cooks), air pressure
    drifts slowly with the weather; the battery drains slowly."""

    type = DeviceType.CLIMATE

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self.temperature = rng.uniform(18, 22)
        self.pressure = rng.uniform(995, 1030)
        self.damp = 0.0
        self.battery = rng.uniform(50, 100)

    def step(self, now: float, dt: float) -> dict[str, Any]:
        target = 20.5 + 1.5 * daylight(now) - (1.5 if _hour(now) < 6 else 0.0)
        pull = min(1.0, 0.001 * dt)
        self.temperature += (target - self.temperature) * pull + self.rng.gauss(0, 0.02)
        self.temperature = _clamp(self.temperature, -40, 85)
        if self.rng.random() < 1 - math.exp(-occupancy(now) * dt / 3600):
            self.damp = 25.0  # a shower or a pot on the stove
        self.damp *= math.exp(-dt / 900)
        humidity = 50 - 1.5 * (self.temperature - 20) + self.damp + self.rng.gauss(0, 0.5)
        # Weather: a random walk pulled back toward the standard atmosphere.
        drift = (1013.25 - self.pressure) * min(1.0, 0.00001 * dt)
        self.pressure = _clamp(
            self.pressure + drift + self.rng.gauss(0, 0.002 * math.sqrt(dt)), 950, 1060
        )
        self.battery = _clamp(self.battery - 0.00001 * dt, 0, 100)
        return {
            "temperature_c": round(self.temperature, 2),
            "humidity_pct": round(_clamp(humidity, 0, 100), 2),
            "pressure_hpa": round(self.pressure, 1),
            "battery_pct": round(self.battery, 2),
        }


MODELS: dict[str, type[DeviceModel]] = {
    model.type: model for model in (Thermostat, AirQuality, Motion, Contact, SmartPlug, Climate)
}


class Generic(DeviceModel):
    """A type of the types file: each number wanders inside its range (a day's swing plus
    noise), each bool flips now and then; an int is the rounded number."""

    # Where a number without a range wanders: 0 and up, like most counters and levels.
    _DEFAULT_SPAN = 100.0

    def __init__(self, rng: random.Random, spec: TypeSpec) -> None:
        super().__init__(rng)
        self.type = spec.name
        self.spec = spec
        self.level = {m.name: rng.random() for m in spec.metrics if m.kind != "bool"}
        self.state = {m.name: rng.random() < 0.5 for m in spec.metrics if m.kind == "bool"}

    def step(self, now: float, dt: float) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for metric in self.spec.metrics:
            if metric.kind == "bool":
                if self.rng.random() < min(1.0, dt / 600):
                    self.state[metric.name] = not self.state[metric.name]
                metrics[metric.name] = self.state[metric.name]
                continue
            low = metric.low if metric.low is not None else 0.0
            high = metric.high if metric.high is not None else low + self._DEFAULT_SPAN
            drift = self.rng.gauss(0, 0.02) * math.sqrt(max(dt, 0.001) / 10)
            self.level[metric.name] = _clamp(self.level[metric.name] + drift, 0.0, 1.0)
            swing = 0.1 * math.sin(2 * math.pi * now / 86_400)
            value = low + (high - low) * _clamp(self.level[metric.name] + swing, 0.0, 1.0)
            metrics[metric.name] = round(value) if metric.kind == "int" else round(value, 2)
        return metrics


def model_for(device_type: str, rng: random.Random, catalogue: TypeCatalogue) -> DeviceModel:
    """The signal model of a device type: a built-in type's own, a user type's generic."""
    model = MODELS.get(device_type)
    if model is not None:
        return model(rng)
    spec = catalogue.get(device_type)
    if spec is None:
        raise ValueError(
            f"unknown device type {device_type!r}: use one of {', '.join(catalogue.names)}"
        )
    return Generic(rng, spec)
