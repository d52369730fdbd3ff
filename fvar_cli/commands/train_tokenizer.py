"""`fvar train-tokenizer`: train (or resume) the dual-path tokenizer on an image folder."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import (AllowDataChangeOption, DeviceOption, LogWithOption, PresetOption, SetOption, resolve,
                       writable_folder)


def train_tokenizer(
    data: Path = typer.Option(..., "--data", "-d", help="Image folder: DIR/<class>/*.jpg (or a flat folder)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory; an existing run there is resumed.",
                             callback=writable_folder),
    preset: str = PresetOption,
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Tokenizer checkpoint (e.g. a converted VAR VAE): train only the alias codebook."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Total optimiser steps (preset's)."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Global batch size (preset's)."),
    perceptual_weights: Optional[Path] = typer.Option(
        None, "--perceptual-weights", help="TorchScript feature network for the perceptual loss (off without)."),
    disc: bool = typer.Option(False, "--disc", help="Adversarial term: train a PatchGAN discriminator along (off without)."),
    disc_weights: Optional[Path] = typer.Option(
        None, "--disc-weights", help="Start the discriminator from this file (a run's discriminator.safetensors); "
                                     "implies --disc."),
    device: str = DeviceOption,
    log_with: Optional[str] = LogWithOption,
    allow_data_change: bool = AllowDataChangeOption,
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Train the tokenizer (reconstruction + VQ losses for both codebooks); resumes when OUT exists."""
    from fvar_core.train.tokenizer import train_tokenizer as run_training

    extra = ([f"tokenizer_train.steps={steps}"] if steps is not None else []) + \
            ([f"tokenizer_train.batch_size={batch}"] if batch is not None else []) + \
            ([f"tokenizer_train.log_with={log_with}"] if log_with is not None else [])
    cfg = resolve(preset, overrides, *extra)
    typer.echo(f"run directory: {out}")
    res = run_training(cfg, data, out, init_from=init_from, perceptual_weights=perceptual_weights, disc=disc,
                       disc_weights=disc_weights, device=device, allow_data_change=allow_data_change)
    m = res.metrics
    tail = f" (loss {m['loss']:.4f}, PSNR {m['psnr']:.2f} dB)" if "psnr" in m else ""
    if res.main_process:  # one summary per run, not per process
        typer.echo(f"tokenizer at step {res.step}: {res.checkpoint}{tail}")
