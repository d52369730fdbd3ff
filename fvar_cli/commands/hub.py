"""`fvar download NAME` (official weights by name, through the Hugging Face Hub's cache, converted)
and `fvar push CKPT --repo ID` (an fvar checkpoint with its model card, to the Hub)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import writable_folder


def download(
    name: Optional[str] = typer.Argument(None, help="A registry name (see --list), e.g. var-d16."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", callback=writable_folder,
                                       help="Checkpoint folder to write (default: $FVAR_CACHE/hub/NAME)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a checkpoint converted from other files."),
    list_: bool = typer.Option(False, "--list", help="List the names and what they fetch."),
) -> None:
    """Fetch official weights by name (huggingface_hub's cache; offline: HF_HUB_OFFLINE=1 uses the
    cache only), check their sha256, and convert them into a ready var + tokenizer checkpoint pair."""
    from fvar_core import bundle
    from fvar_core.errors import UserError
    from fvar_core.models import hub

    if list_:
        bundled = bundle.manifest()["models"]
        for key in sorted(bundled):
            m = bundled[key]
            typer.echo(f"{key:14} bundled  {m.get('summary', m.get('kind', ''))} (inside fvar: nothing to download)")
        for key, e in sorted(hub.REGISTRY.items()):
            pin = e.var.revision if e.var.sha256 else f"{e.var.revision} (not pinned)"
            typer.echo(f"{key:14} hub      {e.var.repo_id}/{e.var.filename} + {e.vae.filename} @ {pin}")
        return
    if bundle.is_bundled_name(name or ""):
        typer.echo(f"{name} is bundled with fvar: use it by name (fvar sample --ckpt {name}); nothing to download")
        return
    if name is None:
        raise UserError("name the weights to download (fvar download --list shows them)")
    entry = hub.lookup(name)
    ck, fetched = hub.download(name, out, overwrite=overwrite)
    for f, got in zip((entry.var, entry.vae), fetched):
        # what a registry pin needs: the commit the file came from, and its checksum
        typer.echo(f"{f.repo_id}/{f.filename}: revision {got.revision}, sha256 {got.sha256}")
    typer.echo(f"{name} → {ck} (tokenizer in {ck / 'tokenizer'}); sample with: fvar sample --ckpt {ck} --class 207")


def push(
    ckpt: Path = typer.Argument(..., help="An fvar checkpoint folder (e.g. runs/x/checkpoints/step-0010000)."),
    repo: str = typer.Option(..., "--repo", help="Hub repository id, e.g. me/fvar-d16 (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (default: main)."),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="Commit message."),
) -> None:
    """Upload a checkpoint folder with its model card (README.md) to the Hugging Face Hub."""
    from fvar_core.models.hub import push as push_checkpoint

    typer.echo(f"pushed {ckpt} → {push_checkpoint(ckpt, repo, private=private, revision=revision, message=message)}")
