"""`fvar plot RUN`: the run's loss and metric curves (metrics.jsonl) as one PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import writable_file


def plot(
    run: Path = typer.Argument(..., help="A run directory (holding metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", callback=writable_file,
                                       help="PNG to write (default: RUN/curves.png)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", "-m",
                                          help="Comma-separated metrics (default: loss and the task's own)."),
) -> None:
    """Plot a run's training curves, one panel per metric, for people without a tracker."""
    from fvar_core.eval.curves import plot_run

    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    typer.echo(f"wrote {plot_run(run, out, names)}")


app = plot
