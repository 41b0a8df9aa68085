"""Small YAML configuration files (types, sources) read into pydantic models, errors in one line."""

from __future__ import annotations

from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["parse_document"]

M = TypeVar("M", bound=BaseModel)


def parse_document(text: str, model: type[M], origin: str, key: str) -> M:
    """`text` (YAML, a mapping with a `key:` list) as `model`; ValueError with the first
    problem in one line, naming the file and the place."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"{origin}: not YAML{where}") from None
    try:
        return model.model_validate(document if document is not None else {})
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in error["loc"]) or "file"
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"] and error["type"] == "model_type":
            message = f"must be a mapping with a `{key}:` list"
        raise ValueError(f"{origin}: {where}: {message}") from None
