"""`fvar studio`: the models in a browser — generate (watching each image come into focus), brush-mask
in- and out-painting, the focus pyramid, the model card (fvar_studio)."""
from __future__ import annotations

from typing import List, Optional

import typer

from ..options import DeviceOption


def studio(
    ckpt: Optional[List[str]] = typer.Option(
        None, "--ckpt", "-c", help="A model to serve (repeatable): a bundled name, run folder, var checkpoint or "
                                   "official var_d*.pth (with --tokenizer). Default: fmnist-32 and fmnist-32-var."),
    tokenizer: Optional[List[str]] = typer.Option(
        None, "--tokenizer", "-t", help="Tokenizer of the --ckpt at the same position (official VQ-VAE .pth)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (anything but localhost: a warning)."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="Port (default: the first free from 7860)."),
    auth: Optional[str] = typer.Option(None, "--auth", help="user:password required to open the page."),
    device: str = DeviceOption,
) -> None:
    """Serve the studio page until Ctrl-C."""
    from fvar_core.errors import UserError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("fvar studio needs Gradio: pip install 'fvar[studio]'") from None
    from fvar_studio.app import launch
    from fvar_studio.service import Studio

    creds = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth takes user:password")
        creds = [user, password]
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach this machine can use the studio"
                   + ("" if creds else " (consider --auth user:password)"), err=True)
    ckpts = list(ckpt or ["fmnist-32", "fmnist-32-var"])
    toks = list(tokenizer or [])
    if len(toks) > len(ckpts):
        raise UserError(f"{len(toks)} --tokenizer for {len(ckpts)} --ckpt")
    s = Studio([(c, toks[i] if i < len(toks) else None) for i, c in enumerate(ckpts)], device=device)
    typer.echo(f"serving {', '.join(s.pipes)}")
    _, url = launch(s, host=host, port=port, auth=creds, block=False)
    typer.echo(f"fvar studio at {url} (Ctrl-C stops it)")
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopped")
