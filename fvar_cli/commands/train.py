"""`fvar train` (the student alone) and `fvar distill` (teacher + student online)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import (AllowDataChangeOption, DeviceOption, LogWithOption, PresetOption, SetOption, resolve,
                       writable_folder)

TokensOption = typer.Option(None, "--tokens", help="Token shards from `fvar tokenize` (no VAE in the step).")
DataOption = typer.Option(None, "--data", "-d", help="Image folder, encoded on the fly (needs --tokenizer).")
TokenizerOption = typer.Option(
    None, "--tokenizer", "-t", help="Tokenizer checkpoint or run; with --tokens, overrides the one the shards name.")
OutOption = typer.Option(None, "--out", "-o", help="Run directory ($FVAR_RUNS or ./runs)/<preset>-<mode>; "
                                                   "an existing run there is resumed.",
                        callback=writable_folder)
StepsOption = typer.Option(None, "--steps", min=1, help="Total optimiser steps (preset's train.steps).")
BatchOption = typer.Option(None, "--batch", min=1, help="Global batch size (preset's train.batch_size).")
WorkersOption = typer.Option(None, "--workers", min=0, help="Data-loading processes (preset's data.num_workers).")


def _run(mode: str, preset: str, overrides, tokens, data, tokenizer, out, steps, batch, device, workers,
         allow_data_change: bool, log_with: Optional[str], save_teacher: bool = False) -> None:
    from fvar_core.runs import default_run_dir
    from fvar_core.train.transformer import train_transformer

    extra = ([f"train.steps={steps}"] if steps is not None else []) + \
            ([f"train.batch_size={batch}"] if batch is not None else []) + \
            ([f"train.log_with={log_with}"] if log_with is not None else [])
    cfg = resolve(preset, overrides, *extra)
    run_dir = out if out is not None else default_run_dir(cfg.name, mode)
    typer.echo(f"run directory: {run_dir}")
    res = train_transformer(cfg, run_dir, distill=mode == "distill", tokens=tokens, data=data, tokenizer=tokenizer,
                            save_teacher=save_teacher, device=device, num_workers=workers,
                            allow_data_change=allow_data_change)
    m = res.metrics
    tail = "".join(f", {k} {m[k]:.4f}" for k in ("loss", "student_ce", "teacher_ce", "acc") if k in m)
    if res.main_process:  # one summary per run, not per process
        typer.echo(f"student at step {res.step}: {res.checkpoint}{tail}")


def train(
    tokens: Optional[Path] = TokensOption,
    data: Optional[Path] = DataOption,
    tokenizer: Optional[Path] = TokenizerOption,
    out: Optional[Path] = OutOption,
    preset: str = PresetOption,
    steps: Optional[int] = StepsOption,
    batch: Optional[int] = BatchOption,
    device: str = DeviceOption,
    workers: Optional[int] = WorkersOption,
    allow_data_change: bool = AllowDataChangeOption,
    log_with: Optional[str] = LogWithOption,
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Train the VAR student alone (plain VAR with pyramid.kernel=area, or FVAR 'w/o teacher'); resumes."""
    _run("train", preset, overrides, tokens, data, tokenizer, out, steps, batch, device, workers, allow_data_change,
         log_with)


def distill(
    tokens: Optional[Path] = TokensOption,
    data: Optional[Path] = DataOption,
    tokenizer: Optional[Path] = TokenizerOption,
    out: Optional[Path] = OutOption,
    preset: str = PresetOption,
    steps: Optional[int] = StepsOption,
    batch: Optional[int] = BatchOption,
    device: str = DeviceOption,
    workers: Optional[int] = WorkersOption,
    save_teacher: bool = typer.Option(False, "--save-teacher", help="Also write the teacher to <run>/teacher."),
    allow_data_change: bool = AllowDataChangeOption,
    log_with: Optional[str] = LogWithOption,
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Train teacher (reads alias tokens) and student online; checkpoints hold the student (vanilla VAR)."""
    _run("distill", preset, overrides, tokens, data, tokenizer, out, steps, batch, device, workers, allow_data_change,
         log_with, save_teacher)
