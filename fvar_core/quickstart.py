"""`fvar quickstart`: the whole FVAR pipeline, small enough for a CPU, on images it draws itself.

    OUT/data/        a drawn ImageFolder, 2 classes ('shapes', 'strokes'; `testimages`)
    OUT/tokenizer/   train-tokenizer run: dual-path tokenizer (disk focus pyramid + alias codebook)
    OUT/shards/      tokenize: structure + alias tokens of every image
    OUT/distill/     distill run: teacher (reads the alias tokens) + student (a plain VAR)
    OUT/samples/     sample: the student's images of both classes, grid.png

Every step is the library function its command calls, with the preset's own logic (resume,
atomic checkpoints, metrics), so the folder is what the five commands give when run by hand, and
a rerun resumes (finished steps are skipped by the loop). The defaults take about four minutes on
two CPU cores (measured 3 min 50 s, 1.2 GiB): a smoke run of the pipeline, not a model — 200
tokenizer steps learn colours and layout, not yet the shapes (PSNR ≈ 13 dB), so the samples are
soft colour fields. More steps (and --device cuda) give more.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

PathLike = Union[str, Path]

# Faster-than-paper settings for a demo: a raised lr and frequent dead-code restarts so a few
# hundred CPU steps show real learning (the same ones the test suite uses).
TOKENIZER_SETTINGS = ("tokenizer_train.lr=3e-3", "tokenizer_train.batch_size=8", "tokenizer_train.dead_code_every=25",
                      "tokenizer_train.log_every=25", "tokenizer_train.precision=fp32")
TRAIN_SETTINGS = ("train.lr=5e-2", "train.batch_size=16", "train.log_every=25", "train.warmup_frac=0.05",
                  "train.precision=fp32")


@dataclass
class QuickstartResult:
    out: Path
    tokenizer_psnr: Optional[float]
    student_ce: Optional[float]
    grid: Path


def quickstart(out: PathLike, *, preset: str = "tiny-64", images_per_class: int = 24, tokenizer_steps: int = 200,
               steps: int = 300, samples_per_class: int = 8, device: Optional[str] = None, console: Any = None,
               say: Callable[[str], None] = print) -> QuickstartResult:
    """Run the five steps into `out` (see the module docstring); `say` gets one line per step."""
    from .checkpoints import build_tokenizer, load_checkpoint
    from .data import ImageFolderDataset, scan_image_folder, validate
    from .devices import pick_device
    from .presets import load_preset
    from .runs import resolve_checkpoint
    from .sampler import load_models, sample_to_dir
    from .shards import tokenize_dataset
    from .testimages import DRAWN_CLASSES, draw_image_folder
    from .tokenizer_training import train_tokenizer
    from .transformer_training import train_transformer

    out = Path(out)
    data = out / "data"
    if not data.is_dir():
        draw_image_folder(data, per_class=images_per_class, seed=0)
    say(f"1/5 data: {data} ({len(DRAWN_CLASSES)} classes × {images_per_class} drawn images)")

    p = load_preset(preset, [*TOKENIZER_SETTINGS, f"tokenizer_train.steps={tokenizer_steps}",
                             f"tokenizer_train.ckpt_every={tokenizer_steps}", "tokenizer_train.sample_every=0",
                             *TRAIN_SETTINGS, f"train.steps={steps}", f"train.ckpt_every={steps}",
                             f"train.sample_every={steps}", f"model.num_classes={len(DRAWN_CLASSES)}"])
    say(f"2/5 train-tokenizer: {tokenizer_steps} steps of {p.tokenizer_train.batch_size} images → {out / 'tokenizer'}")
    tok_fit = train_tokenizer(p, data, out / "tokenizer", device=device, console=console)

    tok_ckpt = resolve_checkpoint(out / "tokenizer", "tokenizer")
    say(f"3/5 tokenize: {data} → {out / 'shards'}")
    good, _ = validate(scan_image_folder(data))
    dataset = ImageFolderDataset.from_config(good, p.resolution, p.data, train=False)
    tokenize_dataset(build_tokenizer(load_checkpoint(tok_ckpt, expect_kind="tokenizer")), p, dataset, out / "shards",
                     batch_size=16, device=pick_device(device or "auto"), tokenizer_path=tok_ckpt.resolve())

    say(f"4/5 distill: {steps} steps of {p.train.batch_size} token sequences → {out / 'distill'}")
    fit = train_transformer(p, out / "distill", distill=True, tokens=out / "shards", device=device, console=console)

    say(f"5/5 sample: {samples_per_class} images of each class → {out / 'samples'}")
    models = load_models(out / "distill", device=device)
    run = sample_to_dir(models, list(range(len(DRAWN_CLASSES))), samples_per_class, 0, models.preset.sample,
                        out / "samples")
    return QuickstartResult(out, tok_fit.metrics.get("psnr"), fit.metrics.get("student_ce"), run.grid)
