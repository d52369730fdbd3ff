"""`fvar convert import|export`: official VAR `.pth` files ⇄ fvar checkpoint directories."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import SetOption, writable_file, writable_folder

app = typer.Typer(help="Convert between official VAR .pth files and fvar checkpoints.", no_args_is_help=True)


def _report(verb: str, r) -> None:
    typer.echo(f"{verb} {r.kind} checkpoint: {r.architecture}")
    typer.echo(f"{r.num_tensors} tensors → {r.out}" + (f" (preset {r.preset})" if r.preset else ""))


@app.command("import")
def import_cmd(
    src: Path = typer.Argument(..., help="Official VAR .pth file (VQ-VAE, e.g. vae_ch160v4096z32.pth, or VAR)."),
    out: Path = typer.Option(..., "--out", "-o", help="fvar checkpoint directory to write (replaced atomically).",
                             callback=writable_folder),
    preset: Optional[str] = typer.Option(
        None, "--preset", "-p",
        help="Preset the weights belong to (default: var-d16-256 for a VQ-VAE, var-dDEPTH-* for a VAR)."),
    overrides: Optional[List[str]] = SetOption,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a checkpoint of the same kind at --out."),
) -> None:
    """Official .pth → fvar checkpoint; the architecture is read off the weights and checked."""
    from fvar_core.models.official import import_official

    _report("imported", import_official(src, out, preset, overrides or [], overwrite=overwrite))


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="fvar tokenizer or var checkpoint directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Official-format .pth file to write (atomically).",
                             callback=writable_file),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file at --out."),
) -> None:
    """fvar checkpoint → official .pth (exactly the official keys, loadable by the VAR code)."""
    from fvar_core.models.official import export_official

    _report("exported", export_official(checkpoint, out, overwrite=overwrite))
