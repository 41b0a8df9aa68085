"""InfluxDB line protocol: escaping and formatting of points (pure logic)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["LineProtocolError", "field_set", "format_field", "point", "series_key"]

FieldValue = float | int | bool | str

_MEASUREMENT = str.maketrans({",": "\\,", " ": "\\ ", "\\": "\\\\"})
_KEY = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ ", "\\": "\\\\"})
# Field keys seen so far, escaped and followed by `=`: a fleet has a few dozen metric
# names, each escaped once instead of once a point. The bound only guards the memory.
_FIELD_KEYS_KEPT = 10_000


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
    if not isinstance(key, str):
        raise LineProtocolError(f"{type(key).__name__} cannot be a key")
    return _check(key, "key").translate(_KEY)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _int(value: int) -> str:
    return f"{value}i"


def _float(value: float) -> str:
    text = repr(value)
    # A finite float's repr ends in a digit; only nan, inf and -inf end in a letter.
    if text[-1] > "9":
        raise LineProtocolError(f"non-finite field value {value}")
    return text


def _str(value: str) -> str:
    text = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


# By exact type first (one dict lookup a field); bool before int for subclasses.
_FORMATS: dict[type, Callable[[object], str]] = {
    bool: _bool,  # type: ignore[dict-item]
    int: _int,  # type: ignore[dict-item]
    float: _float,  # type: ignore[dict-item]
    str: _str,  # type: ignore[dict-item]
}


def format_field(value: object) -> str:
    """bool as true/false, int with the `i` suffix, float in full precision, str quoted;
    anything else (null, a list: JSON that is no field) is a LineProtocolError."""
    formatter = _FORMATS.get(type(value))
    if formatter is None:
        kind = next((kind for kind in _FORMATS if isinstance(value, kind)), None)
        if kind is None:
            raise LineProtocolError(f"{type(value).__name__} cannot be a field value")
        formatter = _FORMATS[kind]
    return formatter(value)


class _FieldKeys(dict[str, str]):
    """Field key -> escaped key and `=`, computed on first use."""

    def __missing__(self, key: str) -> str:
        if len(self) >= _FIELD_KEYS_KEPT:
            self.clear()
        escaped = self[key] = escape_key(key) + "="
        return escaped


_field_keys = _FieldKeys()


def field_set(fields: Mapping[str, object]) -> str:
    """`key=value,...` of a point, in the mapping's order; at least one field."""
    if not fields:
        raise LineProtocolError("a point needs at least one field")
    keys = _field_keys
    parts = []
    # Floats and booleans, most metrics, formatted inline: a call a field would cost as
    # much as the formatting itself.
    for key, value in fields.items():
        kind = type(value)
        if kind is float:
            text = repr(value)
            if text[-1] > "9":
                raise LineProtocolError(f"non-finite field value {value}")
        elif kind is bool:
            text = "true" if value else "false"
        else:
            text = format_field(value)
        parts.append(keys[key] + text)
    return ",".join(parts)


def series_key(measurement: str, tags: Mapping[str, str | None]) -> str:
    """`measurement,tag=value,...` with tags sorted by key and empty ones left out."""
    parts = [escape_measurement(measurement)]
    for key in sorted(tags):
        value = tags[key]
        if value:
            parts.append(f"{escape_key(key)}={escape_key(value)}")
    return ",".join(parts)


def point(series: str, fields: Mapping[str, object], time_ms: int) -> str:
    """One line: a series key from `series_key`, the fields, and the time in milliseconds."""
    return f"{series} {field_set(fields)} {int(time_ms)}"
