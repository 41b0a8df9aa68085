"""InfluxDB line protocol: escaping and formatting of points (pure logic)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["LineProtocolError", "format_field", "point", "series_key"]

FieldValue = float | int | bool | str

_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ ", "\\": "\\\\"})
_KEY = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\\": "\\\\"})


class LineProtocolError(ValueError):
    """A value that line protocol cannot carry (a newline in a name, a non-finite number)."""


def _check(text: str, what: str) -> str:
    if not text:
        raise LineProtocolError(f"empty {what}")
    if "\n" in text or "\r" in text:
        raise LineProtocolError(f"newline in {what} {text[:40]!r}")
    return text


def escape_measurement(name: str) -> str:
    return _check(name, "measurement").translate(_MEASUREMENT)


def escape_key(key: str) -> str:
    """A tag key, tag value or field key: commas, equals signs and spaces are escaped."""
    return _check(key, "key").translate(_KEY)


def format_field(value: FieldValue) -> str:
    """bool as true/false, int with the `i` suffix, float in full precision, str quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise LineProtocolError(f"non-finite field value {value}")
        return repr(value)
    text = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def series_key(measurement: str, tags: Mapping[str, str | None]) -> str:
    """`measurement,tag=value,...` with tags sorted by key and empty ones left out."""
    parts = [escape_measurement(measurement)]
    for key in sorted(tags):
        value = tags[key]
        if value:
            parts.append(f"{escape_key(key)}={escape_key(value)}")
    return ",".join(parts)


def point(series: str, fields: Mapping[str, FieldValue], time_ms: int) -> str:
    """One line: a series key from `series_key`, the fields, and the time in milliseconds."""
    if not fields:
        raise LineProtocolError("a point needs at least one field")
    encoded = ",".join(f"{escape_key(k)}={format_field(v)}" for k, v in fields.items())
    return f"{series} {encoded} {int(time_ms)}"
