"""`fvar tokenize`: encode an image folder once into token shards (DESIGN §5)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def tokenize(
    tokenizer: Path = typer.Option(..., "--tokenizer", "-t", help="Tokenizer checkpoint, or a train-tokenizer run (its newest checkpoint)."),
    data: Path = typer.Option(..., "--data", "-d", help="Image folder: one sub-folder per class."),
    out: Path = typer.Option(..., "--out", "-o", help="Token-shard folder to write (resumed if it exists)."),
    flip: bool = typer.Option(False, "--flip", help="Also store each image's horizontal mirror (2 items per image)."),
    batch: int = typer.Option(64, "--batch", "-b", min=1, help="Images per encoder batch."),
    shard_size: int = typer.Option(10000, "--shard-size", min=1, help="Source images per shard."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="Image-decoding processes (default: the preset's data.num_workers)."),
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

    from fvar_core.checkpoints import build_tokenizer, load_checkpoint
    from fvar_core.devices import pick_device
    from fvar_core.runs import resolve_checkpoint
    from fvar_core.data import ImageFolderDataset, scan_image_folder, validate, validation_report
    from fvar_core.presets import override_preset
    from fvar_core.shards import tokenize_dataset
    from fvar_core.transformer_training import check_tokenizer_fits

    err = Console(stderr=True)
    dev = pick_device(device)
    ckpt = load_checkpoint(resolve_checkpoint(tokenizer, "--tokenizer"), expect_kind="tokenizer")
    preset = override_preset(ckpt.preset, overrides or [], f"tokenizer {ckpt.path}'s preset")
    check_tokenizer_fits(preset, ckpt.preset, f"tokenizer {ckpt.path}",
                         hint="--set may change the pyramid, not the tokenizer's architecture")
    tok = build_tokenizer(ckpt)
    index = scan_image_folder(data)
    n_workers = preset.data.num_workers if workers is None else workers
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("checking files", total=len(index))
        good, bad = validate(index, decode=full_check, progress=lambda d, n: bar.update(task, completed=d))
    if bad:
        typer.echo(validation_report(bad, len(index)), err=True)
    typer.echo(f"{len(good)} images, {len(good.classes)} classes in {data}; tokenizer {ckpt.path} "
               f"({preset.name}, {preset.resolution}px, {preset.num_scales} scales) on {dev}")

    dataset = ImageFolderDataset.from_config(good, preset.resolution, preset.data, train=False)
    # auto_refresh off: a redraw thread would compete with the encoder's OpenMP threads on a small
    # CPU; one redraw per batch is plenty.
    with Progress(*columns, TextColumn("{task.fields[rate]}"), console=err, auto_refresh=False) as bar:
        task = bar.add_task("tokenizing", total=len(good), rate="")

        def progress(done: int, total: int) -> None:
            elapsed = bar.tasks[task].elapsed or 0.0
            bar.update(task, completed=done, rate=f"{done / elapsed:.1f} img/s" if elapsed > 0 else "")
            bar.refresh()

        stats = tokenize_dataset(tok, preset, dataset, out, batch_size=batch, shard_size=shard_size, flip=flip,
                                 device=dev, progress=progress, num_workers=n_workers, tokenizer_path=ckpt.path.resolve())
    if stats.skipped:
        typer.echo(validation_report(stats.skipped, len(good)), err=True)
    resumed = f", {stats.shards_resumed} kept from an earlier run" if stats.shards_resumed else ""
    typer.echo(f"wrote {stats.items} items in {stats.shards_written} shard(s) to {out}{resumed}; "
               f"{stats.total_items} items in total")
    typer.echo(f"{stats.images} images in {stats.seconds:.1f}s: {stats.images_per_s:.1f} images/s; "
               f"skipped {len(bad) + len(stats.skipped)} unreadable file(s)")


app = tokenize  # the `fvar.commands` entry point: a plain function is one command
