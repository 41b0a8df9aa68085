"""`iotgw rules`: alerting rules files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.terminal import console
from gateway.domain.rules_file import load_rules
from gateway.settings import load_settings

__all__ = ["rules_app"]

rules_app = typer.Typer(help="Alerting rules.", no_args_is_help=True)


@rules_app.command("validate")
def rules_validate(
    file: Annotated[Path, typer.Argument(help="A rules file (YAML).")],
) -> None:
    """Check a rules file; print every problem with its line and field."""
    rules = load_rules(file, load_settings().catalogue()).rules
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(r.kind for r in rules).items()))
    console.print(f"{file}: {len(rules)} rules ({kinds})", highlight=False)
