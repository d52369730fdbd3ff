"""Options shared by every command that takes a preset (one definition, many commands)."""
from __future__ import annotations

from typing import List, Optional

import typer

from fvar_core.config import Preset
from fvar_core.presets import load_preset

PresetOption = typer.Option(
    "d16-256", "--preset", "-p", help="Preset name (see `fvar presets list`) or a YAML file.")
SetOption = typer.Option(
    None, "--set", "-s", metavar="KEY.PATH=VALUE",
    help="Override one preset field, e.g. --set train.lr=2e-4 (repeatable).")


def resolve(preset: str, overrides: Optional[List[str]], *extra: str) -> Preset:
    """The validated preset with `--set` overrides, then command-flag overrides, applied."""
    return load_preset(preset, [*(overrides or []), *extra])
