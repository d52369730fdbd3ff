"""`fvar quickstart`: Fashion-MNIST (or drawn images) → tokenizer → tokens → distillation → samples → evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..options import DeviceOption, writable_folder


def quickstart(
    out: Path = typer.Option(Path("fvar-quickstart"), "--out", "-o", help="Folder for every step's output "
                                                                          "(a rerun resumes).",
                             callback=writable_folder),
    dataset: str = typer.Option("auto", "--dataset", help="fashion-mnist, drawn, or auto (Fashion-MNIST when a "
                                                          "local copy exists or --download is given)."),
    source: Optional[Path] = typer.Option(None, "--source", help="Folder with Fashion-MNIST's four *-ubyte.gz files."),
    download: bool = typer.Option(False, "--download", help="Download Fashion-MNIST when no local copy exists."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p",
                                         help="Preset (default: fmnist-32; tiny-64 for drawn images)."),
    tokenizer_steps: Optional[int] = typer.Option(None, "--tokenizer-steps", min=1,
                                                  help="train-tokenizer steps (default: the preset's)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="distill steps (default: the preset's)."),
    per_class: int = typer.Option(100, "--samples-per-class", min=1, help="Images sampled per class at the end."),
    train_per_class: Optional[int] = typer.Option(
        None, "--train-per-class", min=1, help="Train images per class to tokenize (default 512)."),
    classifier_epochs: float = typer.Option(2.0, "--classifier-epochs", min=0.01,
                                            help="Epochs of the evaluation classifier."),
    data_per_class: Optional[int] = typer.Option(
        None, "--data-per-class", min=1, help="Export only the first N Fashion-MNIST images per class and split."),
    images: int = typer.Option(24, "--images-per-class", min=2, help="Drawn images per class (drawn data only)."),
    device: str = DeviceOption,
) -> None:
    """The whole pipeline on real data in about 15 minutes on two CPU cores: Fashion-MNIST, the
    dual-path tokenizer, its tokens, teacher–student distillation, samples from the student, and
    an offline evaluation (class-conditional accuracy, feature-space FID) with calibration rows."""
    from fvar_core.pipelines.quickstart import quickstart as run, summary

    res = run(out, dataset=dataset, source=source, download=download, preset=preset, tokenizer_steps=tokenizer_steps,
              steps=steps, per_class=per_class, train_per_class=train_per_class, data_per_class=data_per_class,
              classifier_epochs=classifier_epochs,
              images_per_class=images, device=device, say=typer.echo)
    for line in summary(res):
        typer.echo(line)
