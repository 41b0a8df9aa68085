"""Loading a rules file: YAML into the models of schemas/rules.py, errors with locations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.errors import IotgwError
from schemas.rules import RulesFile
from schemas.types import BUILTIN_CATALOGUE, TypeCatalogue

__all__ = ["RulesFileError", "load_rules"]


class RulesFileError(IotgwError):
    """A rules file that cannot be used; one line per problem, each with its location."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems), exit_code=2)
        self.problems = problems


def _line(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The line (1-based) of the YAML node at a pydantic error location."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(
                (
                    v
                    for k, v in node.value
                    if k.value == part or (part == "for_" and k.value == "for")
                ),
                None,
            )
            if found is None:
                continue  # e.g. the union's tag in the location: not a key of the file
            node = found
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
        else:
            continue
        line = node.start_mark.line + 1
    return line


def _where(loc: tuple[int | str, ...]) -> str:
    kinds = {"threshold", "absence", "rate", "state", "offline"}
    parts = [p for p in loc if p not in kinds]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text.replace("for_", "for") or "(file)"


def load_rules(path: Path, catalogue: TypeCatalogue = BUILTIN_CATALOGUE) -> RulesFile:
    """The rules of `path` for the device types of `catalogue`; RulesFileError listing every
    problem with file, line and field."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesFileError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RulesFileError([f"{path}{where}: not valid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise RulesFileError([f"{path}: must be a mapping with a `rules:` list"])
    try:
        return RulesFile.model_validate(data, context={"catalogue": catalogue})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            loc = tuple(error["loc"])
            line = _line(node, loc)
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{path}:{line or '?'}: {_where(loc)}: {message}")
        raise RulesFileError(problems) from None
