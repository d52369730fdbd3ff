"""`fvar data`: real datasets written as ImageFolders that every other command reads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import writable_folder

app = typer.Typer(help="Write real datasets as image folders (train/ and test/, one folder per class).",
                  no_args_is_help=True)


@app.command("fashion-mnist")
def fashion_mnist(
    out: Path = typer.Option(Path("data/fashion-mnist"), "--out", "-o", help="Folder to write train/, test/ into.",
                             callback=writable_folder),
    source: Optional[Path] = typer.Option(
        None, "--source", help="Folder with the four *-ubyte.gz files (default: Debian's dataset-fashion-mnist "
                               "copy, then fvar's cache, then a download)."),
    size: int = typer.Option(32, "--size", help="Output side in pixels."),
    mode: str = typer.Option("pad", "--mode", help="pad (28 px centred on black) or resize (LANCZOS)."),
    split: str = typer.Option("train,test", "--split", help="Comma-separated splits to write."),
    per_class: Optional[int] = typer.Option(None, "--per-class", min=1, help="Keep the first N images per class."),
    download: bool = typer.Option(True, "--download/--no-download",
                                  help="Download from the official location when no local copy exists."),
) -> None:
    """Fashion-MNIST (70,000 garment photographs, 10 classes, MIT licence) as RGB PNG folders."""
    from fvar_core.data.fashion_mnist import export

    splits = [s.strip() for s in split.split(",") if s.strip()]
    res = export(out, source=source, size=size, mode=mode, splits=splits, per_class=per_class,  # type: ignore[arg-type]
                 allow_download=download, say=typer.echo)
    typer.echo(f"done: {res.out} (classes.json, {', '.join(res.counts)})")
