"""Writes the JSON Schema files of the data contract into schemas/json/.

    python -m schemas.generate

A test fails when the checked-in files drift from the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from schemas.device import Device
from schemas.reading import CanonicalReading
from schemas.types import BUILTIN_CATALOGUE, TypeCatalogue

JSON_DIR = Path(__file__).parent / "json"


def schemas() -> dict[str, dict[str, Any]]:
    """File name to JSON Schema, for every document of the contract."""
    return {
        "reading.schema.json": reading_schema(),
        "canonical-reading.schema.json": _titled(
            TypeAdapter(CanonicalReading), "iotgw canonical reading (Kafka iot.readings)"
        ),
        "device.schema.json": _titled(TypeAdapter(Device), "iotgw device (Kafka iot.devices)"),
    }


def reading_schema(catalogue: TypeCatalogue = BUILTIN_CATALOGUE) -> dict[str, Any]:
    """The reading payload's schema for the types of `catalogue` (a types file adds its own)."""
    return _titled(catalogue.payload, "iotgw reading payload (MQTT)")


def _titled(adapter: TypeAdapter[Any], title: str) -> dict[str, Any]:
    schema = adapter.json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, **schema}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for name, schema in schemas().items():
        (JSON_DIR / name).write_text(render(schema))
        print(f"wrote {JSON_DIR / name}")


if __name__ == "__main__":
    main()
