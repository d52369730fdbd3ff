"""`fvar release train` (the recipe of the bundled models, from the IDX files) and `fvar release pack`
(their weights into the package)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import DeviceOption, writable_folder

app = typer.Typer(help="The models that ship inside fvar: their recipe, and packing them.", no_args_is_help=True)


@app.command()
def train(
    names: Optional[List[str]] = typer.Argument(None, help="Which recipes (default: all): fmnist-32, fmnist-32-var."),
    out: Path = typer.Option(Path("release"), "--out", "-o", callback=writable_folder,
                             help="Folder for every step (a rerun resumes)."),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder with Fashion-MNIST's four *-ubyte.gz files."),
    download: bool = typer.Option(False, "--download", help="Download Fashion-MNIST when no local copy exists."),
    device: str = DeviceOption,
) -> None:
    """Train the bundled models from Fashion-MNIST's IDX files: data, the feature classifier, then per
    model tokenizer → tokens → transformer → evaluation (95 minutes for both on two CPU cores)."""
    from fvar_core.eval.feature_metrics import format_table
    from fvar_core.pipelines.release import RECIPES, train_release

    reports = train_release(out, names or list(RECIPES), source=source, download=download, device=device,
                            say=typer.echo)
    for name, rep in reports.items():
        secs = rep["recipe"]["seconds"]
        typer.echo(f"\n{name}: {sum(v for k, v in secs.items() if 'shared' not in k) / 60:.1f} min "
                   f"(+ {secs.get('data+classifier (shared)', 0) / 60:.1f} min shared)")
        typer.echo(format_table(rep))


@app.command()
def pack(
    out: Path = typer.Argument(Path("release"), help="The folder `fvar release train` wrote."),
    dest: Optional[Path] = typer.Option(None, "--dest", callback=writable_folder,
                                        help="Bundle folder to write (default: the package's own, fvar_core/bundled)."),
) -> None:
    """Copy the trained release into the package: float16 weights, model cards, the manifest of sha256s."""
    from fvar_core.pipelines.release import pack_release

    pack_release(out, dest, say=typer.echo)
