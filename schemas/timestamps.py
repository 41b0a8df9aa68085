"""Reading timestamps: epoch milliseconds, or RFC 3339 text with an explicit offset."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictInt, WithJsonSchema

__all__ = ["EpochMs"]


def _to_epoch_ms(value: Any) -> Any:
    """`ts` as epoch milliseconds: an integer as is, RFC 3339 text only with an explicit offset.

    A timestamp without a zone is rejected, never guessed.
    """
    if isinstance(value, str):
        if len(value) < 19 or value[10] not in "Tt ":
            raise ValueError("ts text must be RFC 3339, e.g. 2026-11-26T07:00:00.123Z")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("ts text must be RFC 3339, e.g. 2026-11-26T07:00:00.123Z") from None
        if parsed.tzinfo is None:
            raise ValueError("ts has no time zone offset; add Z or +hh:mm")
        return int(parsed.timestamp() * 1000)
    return value


EpochMs = Annotated[
    StrictInt,
    Field(ge=0, le=253_402_300_799_999),  # up to year 9999
    BeforeValidator(_to_epoch_ms),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "description": "epoch milliseconds"},
                {
                    "type": "string",
                    "format": "date-time",
                    "description": "RFC 3339 with an explicit offset (Z or +hh:mm)",
                },
            ]
        }
    ),
]
