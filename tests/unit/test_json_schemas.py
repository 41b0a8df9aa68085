"""The checked-in JSON Schema files match the pydantic models."""

from __future__ import annotations

import pytest

from schemas.generate import JSON_DIR, render, schemas

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(schemas()))
def test_checked_in_schema_matches_models(name: str) -> None:
    """Run `python -m schemas.generate` after changing a model; this fails until you do."""
    path = JSON_DIR / name
    assert path.exists(), f"{path} is missing: run python -m schemas.generate"
    assert path.read_text() == render(schemas()[name]), f"{path} drifted from the models"


def test_reading_schema_names_every_device_type() -> None:
    """The reading schema lists the five device types of DESIGN.md."""
    text = (JSON_DIR / "reading.schema.json").read_text()
    for device_type in ("thermostat", "air_quality", "motion", "contact", "smart_plug"):
        assert f'"const": "{device_type}"' in text
