"""`fvar presets list|show`: the named configurations."""
from __future__ import annotations

from typing import List, Optional

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich import box
from rich.table import Table

from fvar_core.presets import list_presets, load_preset, preset_to_yaml

from ..options import SetOption

app = typer.Typer(help="List and show the named presets (model, tokenizer, pyramid, training).",
                  no_args_is_help=True)


@app.command("list")
def list_cmd() -> None:
    """A table of every preset."""
    table = Table(title="fvar presets", caption="K scales, L tokens; details: fvar presets show NAME",
                  box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for col in ("name", "px", "model", "K", "L", "codebooks", "pyramid", "teacher"):
        table.add_column(col, no_wrap=True)
    for name in list_presets():
        p = load_preset(name)
        codebooks = f"{p.tokenizer.vocab_size}" + (f"+{p.tokenizer.alias_vocab_size}"
                                                    if p.tokenizer.alias_vocab_size else "")
        pyr = p.pyramid.kernel if p.pyramid.kernel == "area" else \
            f"{p.pyramid.kernel} {p.pyramid.schedule} {p.pyramid.rho_max:g}px"
        model = f"d{p.model.depth} {p.model.width}/{p.model.num_heads}h"
        table.add_row(name, str(p.resolution), model, str(p.num_scales), str(p.seq_len), codebooks, pyr,
                      f"M={p.teacher.xattn_blocks}" if p.teacher.enabled else "-")
    console = Console()
    if not console.is_terminal:  # piped: rich would squeeze to 80 columns and elide
        console = Console(width=120)
    console.print(table)


@app.command("show")
def show_cmd(name: str = typer.Argument(..., help="Preset name or YAML file."),
             overrides: Optional[List[str]] = SetOption) -> None:
    """The fully resolved preset as YAML (extends followed, overrides applied)."""
    text = preset_to_yaml(load_preset(name, overrides or []))
    console = Console()
    if console.is_terminal:
        console.print(Syntax(text, "yaml"))
    else:
        typer.echo(text, nl=False)
