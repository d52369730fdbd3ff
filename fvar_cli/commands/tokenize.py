"""`fvar tokenize`: encode an image folder once into token shards (docs/design.md §5)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import DeviceOption, writable_folder


def tokenize(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer checkpoint, or a train-tokenizer run (its newest checkpoint)."),
    data: Path = typer.Option(..., "--data", "-d", help="Image folder: one sub-folder per class."),
    out: Path = typer.Option(..., "--out", "-o", help="Token-shard folder to write (resumed if it exists).",
                             callback=writable_folder),
    flip: bool = typer.Option(False, "--flip", help="Also store each image's horizontal mirror (2 items per image)."),
    batch: int = typer.Option(64, "--batch", "-b", min=1, help="Images per encoder batch."),
    shard_size: int = typer.Option(10000, "--shard-size", min=1, help="Source images per shard."),
    encode_precision: str = typer.Option(
        "fp32", "--encode-precision", help="fp32 (default: the tokens exactly), bf16 or tf32 (CUDA): faster "
                                           "encodes whose tokens move across near ties."),
    encode_chunk: Optional[int] = typer.Option(
        None, "--encode-chunk", min=1, help="Encoder rows per call (images × distinct focus views; default: what half "
                                            "the device's free memory holds). Tokens do not depend on it."),
    device: str = DeviceOption,
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="Image-decoding processes (default: the preset's data.num_workers)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", min=1,
                                            help="Encode only the first N images of each class."),
    full_check: bool = typer.Option(False, "--full-check",
                                    help="Decode every file up front instead of a header check (slower)."),
    overrides: Optional[List[str]] = typer.Option(
        None, "--set", "-s", metavar="KEY.PATH=VALUE",
        help="Override a field of the tokenizer's preset, e.g. --set pyramid.kernel=gaussian (the paper's "
             "pyramid ablations); the tokenizer's architecture cannot change."),
) -> None:
    """Encode an image folder with a tokenizer into token shards for transformer training.

    Centre crops (VAR's eval preprocessing), so the tokens are a function of the files.

    Unreadable files are skipped and counted; rerunning the command resumes after the last complete shard.
    """
    # imported here so `fvar --help` stays fast
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from fvar_core.data.folders import validation_report
    from fvar_core.runs import SKIPPED_FILES
    from fvar_core.data.tokenize import tokenize_folder

    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    check_bar = Progress(*columns, console=err, transient=True)
    # auto_refresh off: a redraw thread would compete with the encoder's OpenMP threads on a small
    # CPU; one redraw per batch is plenty.
    bar = Progress(*columns, TextColumn("{task.fields[rate]}"), console=err, auto_refresh=False)
    tasks: dict = {}

    def checking(done: int, total: int) -> None:
        if "check" not in tasks:
            check_bar.start()
            tasks["check"] = check_bar.add_task("checking files", total=total)
        check_bar.update(tasks["check"], completed=done)

    def checked(good, bad, description: str) -> None:
        if tasks.pop("check", None) is not None:
            check_bar.stop()
        if bad:
            typer.echo(validation_report(bad, len(good) + len(bad), listed_in=out / SKIPPED_FILES), err=True)
        typer.echo(description)
        bar.start()
        tasks["encode"] = bar.add_task("tokenizing", total=len(good), rate="")

    def progress(done: int, total: int) -> None:
        elapsed = bar.tasks[tasks["encode"]].elapsed or 0.0
        bar.update(tasks["encode"], completed=done, rate=f"{done / elapsed:.1f} img/s" if elapsed > 0 else "")
        bar.refresh()

    try:
        run = tokenize_folder(tokenizer, data, out, overrides=overrides or [], per_class=per_class, flip=flip,
                              batch_size=batch, shard_size=shard_size, device=device, workers=workers,
                              full_check=full_check, check_progress=checking, progress=progress, on_checked=checked,
                              encode_chunk=encode_chunk, encode_precision=encode_precision)
    finally:  # a bar never started must not be stopped: stop() prints a line
        if "check" in tasks:
            check_bar.stop()
        if "encode" in tasks:
            bar.stop()
    stats = run.stats
    if stats.skipped:
        typer.echo(validation_report(stats.skipped, len(run.index), listed_in=out / SKIPPED_FILES), err=True)
    resumed = f", {stats.shards_resumed} kept from an earlier run" if stats.shards_resumed else ""
    typer.echo(f"wrote {stats.items} items in {stats.shards_written} shard(s) to {out}{resumed}; "
               f"{stats.total_items} items in total")
    typer.echo(f"{stats.images} images in {stats.seconds:.1f}s: {stats.images_per_s:.1f} images/s; "
               f"skipped {len(run.bad) + len(stats.skipped)} unreadable file(s)")


app = tokenize  # the `fvar.commands` entry point: a plain function is one command
