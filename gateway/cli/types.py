"""`iotgw types`: the device types, built-in and the user's (the types file), and their schema."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from gateway.cli.terminal import console
from gateway.errors import IotgwError
from gateway.settings import load_settings
from schemas.generate import reading_schema, render
from schemas.types import MetricSpec, TypeCatalogue, TypesFileError, parse_types

__all__ = ["metric_range", "type_table", "types_app"]

types_app = typer.Typer(
    help="Device types: the built-in ones and the types file's (IOTGW_TYPES_FILE).",
    no_args_is_help=True,
)

# The file `iotgw types schema --out DIR` writes; the name of the checked-in contract file.
SCHEMA_FILE = "reading.schema.json"


def metric_range(metric: MetricSpec) -> str:
    """The range as DESIGN.md writes it: `-40..85`, `>= 0`, `<= 10`; empty when unbounded."""
    low, high = metric.low, metric.high
    if low is not None and high is not None:
        return f"{low:g}..{high:g}"
    if low is not None:
        return f">= {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return ""


def type_table(catalogue: TypeCatalogue, types_file: Path) -> Table:
    """A row per metric, the type named on its first; built-in types first, then the file's."""
    table = Table("type", "defined in", "metric", "kind", "range")
    for spec in catalogue.types.values():
        # Text, not markup: a path may hold brackets.
        origin = Text("built-in" if spec.builtin else str(types_file))
        for i, metric in enumerate(spec.metrics):
            last = i == len(spec.metrics) - 1
            table.add_row(
                spec.name if i == 0 else "",
                origin if i == 0 else "",
                metric.name,
                metric.kind,
                metric_range(metric),
                end_section=last,
            )
    return table


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise IotgwError(f"{path}: not UTF-8 text", exit_code=2) from None
    except OSError as exc:
        raise IotgwError(f"cannot read {path}: {exc.strerror}", exit_code=2) from None


@types_app.command("list")
def types_list() -> None:
    """Every device type the gateway knows, with each metric's kind and range."""
    settings = load_settings()
    console.print(type_table(settings.catalogue(), settings.types_file))


@types_app.command("validate")
def types_validate(
    file: Annotated[
        Path | None,
        typer.Argument(help="A types file (YAML); default IOTGW_TYPES_FILE (types.yaml)."),
    ] = None,
) -> None:
    """Check a types file: print its types, or exit 2 with the first problem in one line."""
    if file is None:
        file = load_settings().types_file
        if not file.exists():
            # What the services do too: no types file means the built-in types only.
            console.print(
                f"{file}: no such file; the built-in types only",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            return
    try:
        catalogue = parse_types(_read(file), str(file))
    except TypesFileError as exc:
        raise IotgwError(str(exc), exit_code=2) from None
    names = [spec.name for spec in catalogue.user_types]
    counted = f"{len(names)} type" if len(names) == 1 else f"{len(names)} types"
    listed = f" ({', '.join(names)})" if names else ""
    console.print(f"{file}: {counted}{listed}", highlight=False, markup=False, soft_wrap=True)


@types_app.command("schema")
def types_schema(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", metavar="DIR", help=f"Write {SCHEMA_FILE} into DIR instead of printing it."
        ),
    ] = None,
) -> None:
    """The JSON Schema of the reading payload, with every type: built-in and the types file's."""
    text = render(reading_schema(load_settings().catalogue()))
    if out is None:
        # Plain output: JSON for files and pipes must not be wrapped or highlighted.
        typer.echo(text, nl=False)
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IotgwError(f"cannot make folder {out}: {exc.strerror}", exit_code=2) from None
    target = out / SCHEMA_FILE
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise IotgwError(f"cannot write {target}: {exc.strerror}", exit_code=2) from None
    console.print(f"wrote {target}", highlight=False, markup=False, soft_wrap=True)
