"""`fvar quickstart`: draw a tiny dataset, then train-tokenizer → tokenize → distill → sample."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def quickstart(
    out: Path = typer.Option(Path("fvar-quickstart"), "--out", "-o", help="Folder for every step's output "
                                                                          "(a rerun resumes)."),
    preset: str = typer.Option("tiny-64", "--preset", "-p", help="A tiny preset: tiny-64 or tiny-32."),
    images: int = typer.Option(24, "--images-per-class", min=2, help="Drawn images per class (2 classes)."),
    tokenizer_steps: int = typer.Option(200, "--tokenizer-steps", min=1, help="train-tokenizer steps."),
    steps: int = typer.Option(300, "--steps", min=1, help="distill steps."),
    samples: int = typer.Option(8, "--samples-per-class", min=1, help="Images sampled per class at the end."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: CUDA when available)."),
) -> None:
    """The whole pipeline in about four minutes on two CPU cores: the dual-path tokenizer, its tokens,
    the teacher–student distillation and samples from the student, on images it draws itself."""
    from fvar_core.quickstart import quickstart as run

    res = run(out, preset=preset, images_per_class=images, tokenizer_steps=tokenizer_steps, steps=steps,
              samples_per_class=samples, device=device, say=typer.echo)
    psnr = f"tokenizer PSNR {res.tokenizer_psnr:.1f} dB, " if res.tokenizer_psnr is not None else ""
    ce = f"student CE {res.student_ce:.3f}, " if res.student_ce is not None else ""
    typer.echo(f"done: {psnr}{ce}samples in {res.grid}")
