"""`fvar quickstart`: the whole FVAR pipeline on real data, small enough for a CPU.

With Fashion-MNIST (a local copy, or downloaded when asked), preset fmnist-32:

    OUT/data/          fvar data fashion-mnist: train/ and test/ ImageFolders, 32 px
    OUT/classifier/    fvar eval classifier train: the offline feature network (test accuracy)
    OUT/tokenizer/     fvar train-tokenizer: dual-path tokenizer (disk focus pyramid + alias codebook)
    OUT/shards/        fvar tokenize: structure + alias tokens of the first N train images per class
    OUT/distill/       fvar distill: teacher (reads the alias tokens) + student (a plain VAR)
    OUT/samples/       fvar eval --feature-net: 100 samples per class, then the evaluation table
                       (class-conditional accuracy, feature-space FID/KID/P-R) beside the calibration
                       rows (real train images; tokenizer reconstructions of the test split)

Without a copy of Fashion-MNIST it falls back to images it draws itself (2 classes, preset
tiny-64; a smoke run of the commands, not a model) and says so.

Every step is the library function its command calls, so the folder is what the commands give
when run by hand, and a rerun resumes (finished steps are skipped by each step's own logic).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

from fvar_core.errors import UserError
from fvar_core.data.fashion_mnist import export, find_source
from fvar_core.data.images import load_image, save_png
from fvar_core.data.tokenize import tokenize_folder
from fvar_core.eval.classifier import ClassifierConfig, train_classifier
from fvar_core.eval.evaluate import write_report
from fvar_core.eval.feature_metrics import feature_evaluation, format_table
from fvar_core.focus.testimages import DRAWN_CLASSES, draw_image_folder
from fvar_core.presets import load_preset
from fvar_core.sample.loading import load_models
from fvar_core.sample.outputs import make_grid, sample_to_dir
from fvar_core.train.tokenizer import train_tokenizer
from fvar_core.train.transformer import train_transformer

PathLike = Union[str, Path]

# The drawn-image fallback: faster-than-paper settings so a few hundred CPU steps show learning.
DRAWN_TOKENIZER_SETTINGS = ("tokenizer_train.lr=3e-3", "tokenizer_train.batch_size=8",
                            "tokenizer_train.dead_code_every=25", "tokenizer_train.log_every=25",
                            "tokenizer_train.precision=fp32")
DRAWN_TRAIN_SETTINGS = ("train.lr=5e-2", "train.batch_size=16", "train.log_every=25", "train.warmup_frac=0.05",
                        "train.precision=fp32")


# Train images per class that are tokenized for the transformer: encoding costs ~12 ms per image on
# two cores (5 encoder passes), so 5,120 images, seen ~2.5 times by fmnist-32's 400 × 32 sequences.
TRAIN_PER_CLASS = 512


@dataclass
class QuickstartResult:
    out: Path
    dataset: str                       # "fashion-mnist" or "drawn"
    tokenizer_psnr: Optional[float]    # last training log's PSNR
    student_ce: Optional[float]
    grid: Path
    report: Optional[Dict[str, Any]] = None  # the feature-space evaluation (Fashion-MNIST only)
    table: Optional[str] = None
    seconds: Dict[str, float] = field(default_factory=dict)


def _steps_overrides(tokenizer_steps: Optional[int], steps: Optional[int]) -> List[str]:
    out: List[str] = []
    if tokenizer_steps is not None:
        out += [f"tokenizer_train.steps={tokenizer_steps}",
                f"tokenizer_train.ckpt_every={tokenizer_steps}", f"tokenizer_train.sample_every={tokenizer_steps}"]
    if steps is not None:
        out += [f"train.steps={steps}", f"train.ckpt_every={steps}", f"train.sample_every={steps}"]
    return out


def fashion_mnist_available(source: Optional[PathLike] = None) -> bool:
    """A local copy exists (the --source folder, Debian's package, or fvar's cache)."""
    try:
        find_source(source, allow_download=False)
        return True
    except UserError:
        return False


def quickstart(out: PathLike, *, dataset: str = "auto", source: Optional[PathLike] = None,
               download: bool = False, preset: Optional[str] = None, tokenizer_steps: Optional[int] = None,
               steps: Optional[int] = None, per_class: int = 100, train_per_class: Optional[int] = None,
               data_per_class: Optional[int] = None,
               classifier_epochs: float = 2.0, images_per_class: int = 24, device: Optional[str] = None,
               console: Any = None, say: Callable[[str], None] = print) -> QuickstartResult:
    """Run the pipeline into `out` (see the module docstring); `say` gets one line per step.

    dataset: "fashion-mnist", "drawn", or "auto" (Fashion-MNIST when a local copy exists, or with
    `download`; else drawn). per_class: samples per class (and real images per class in the
    floor row). train_per_class: train images per class that are tokenized for the transformer
    (default TRAIN_PER_CLASS). data_per_class: export only the first N
    images of each class of each split (for tests; default all 70,000)."""
    out = Path(out)
    if dataset not in ("auto", "fashion-mnist", "drawn"):
        raise UserError(f"--dataset {dataset!r}: choose auto, fashion-mnist or drawn")
    if dataset == "auto":
        if fashion_mnist_available(source) or download:
            dataset = "fashion-mnist"
        else:
            dataset = "drawn"
            say("no local copy of Fashion-MNIST (apt-get install dataset-fashion-mnist, --source DIR or --download): "
                "falling back to drawn images — a smoke run of the commands, not a model")
    if dataset == "fashion-mnist":
        return _fashion_mnist(out, source=source, download=download, preset=preset or "fmnist-32",
                              tokenizer_steps=tokenizer_steps, steps=steps, per_class=per_class,
                              train_per_class=train_per_class, data_per_class=data_per_class,
                              classifier_epochs=classifier_epochs, device=device,
                              console=console, say=say)
    return _drawn(out, preset=preset or "tiny-64", images_per_class=images_per_class,
                  tokenizer_steps=200 if tokenizer_steps is None else tokenizer_steps,
                  steps=300 if steps is None else steps, per_class=min(per_class, 8), device=device,
                  console=console, say=say)


def _fashion_mnist(out: Path, *, source, download, preset, tokenizer_steps, steps, per_class, train_per_class,
                   data_per_class, classifier_epochs, device, console, say) -> QuickstartResult:
    times: Dict[str, float] = {}
    t = time.perf_counter()
    p = load_preset(preset, _steps_overrides(tokenizer_steps, steps))
    data = out / "data"
    say(f"1/6 data: Fashion-MNIST → {data}")
    export(data, source=source, size=p.resolution, per_class=data_per_class, allow_download=download,
           say=lambda s: say(f"    {s}"))
    train, test = data / "train", data / "test"
    times["data"] = time.perf_counter() - t

    t = time.perf_counter()
    clf_dir = out / "classifier"
    if not (clf_dir / "config.json").is_file():
        say(f"2/6 classifier: {classifier_epochs:g} epochs on {train} → {clf_dir}")
        res = train_classifier(train, clf_dir, ClassifierConfig(epochs=classifier_epochs, resolution=p.resolution),
                               val=test, device=device, say=lambda s: say(f"    {s}"))
        say(f"    test accuracy {100 * res.val_accuracy:.2f}% ({res.seconds:.0f} s)")
    else:
        say(f"2/6 classifier: {clf_dir} (already trained)")
    times["classifier"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"3/6 train-tokenizer: {p.tokenizer_train.steps} steps of {p.tokenizer_train.batch_size} images → "
        f"{out / 'tokenizer'}")
    tok_fit = train_tokenizer(p, train, out / "tokenizer", device=device, console=console)
    times["train-tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    n_train = train_per_class or TRAIN_PER_CLASS
    say(f"4/6 tokenize: the first {n_train} train images of each class → {out / 'shards'}")
    tokenize_folder(out / "tokenizer", train, out / "shards", per_class=n_train, batch_size=128,
                    device=device or "auto")
    times["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"5/6 distill: {p.train.steps} steps of {p.train.batch_size} token sequences → {out / 'distill'}")
    fit = train_transformer(p, out / "distill", distill=True, tokens=out / "shards", device=device, console=console)
    times["distill"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"6/6 sample + evaluate: {per_class} images per class → {out / 'samples'}, against {test}")
    report = feature_evaluation(clf_dir, test, ckpt=out / "distill", per_class=per_class, out=out / "samples",
                                real=train, device=device, show_progress=False)
    times["sample+eval"] = time.perf_counter() - t
    report["quickstart_seconds"] = {k: round(v, 1) for k, v in times.items()}
    grid = _grid(out / "samples", per_class, p.model.num_classes)
    write_report(report, out / "report.json")
    table = format_table(report)
    (out / "report.md").write_text(table + "\n", encoding="utf-8")
    return QuickstartResult(out, "fashion-mnist", tok_fit.metrics.get("psnr"), fit.metrics.get("student_ce"), grid,
                            report, table, times)


def _grid(folder: Path, per_class: int, num_classes: int, cols: int = 10) -> Path:
    """grid.png: the first `cols` samples of every class, one row per class."""
    import torch

    rows = []
    for c in range(num_classes):
        for i in range(min(cols, per_class)):
            rows.append(load_image(folder / f"{c * per_class + i:06d}.png"))  # (3, H, W) in [0, 1]
    grid = folder / "grid.png"
    save_png(make_grid(torch.stack(rows), min(cols, per_class)), grid)
    return grid


def _drawn(out: Path, *, preset, images_per_class, tokenizer_steps, steps, per_class, device, console,
           say) -> QuickstartResult:
    data = out / "data"
    if not data.is_dir():
        draw_image_folder(data, per_class=images_per_class, seed=0)
    say(f"1/5 data: {data} ({len(DRAWN_CLASSES)} classes × {images_per_class} drawn images)")
    p = load_preset(preset, [*DRAWN_TOKENIZER_SETTINGS, *DRAWN_TRAIN_SETTINGS,
                             *_steps_overrides(tokenizer_steps, steps), "tokenizer_train.sample_every=0",
                             f"model.num_classes={len(DRAWN_CLASSES)}"])
    say(f"2/5 train-tokenizer: {tokenizer_steps} steps of {p.tokenizer_train.batch_size} images → {out / 'tokenizer'}")
    tok_fit = train_tokenizer(p, data, out / "tokenizer", device=device, console=console)
    say(f"3/5 tokenize: {data} → {out / 'shards'}")
    tokenize_folder(out / "tokenizer", data, out / "shards", batch_size=16, device=device or "auto")
    say(f"4/5 distill: {steps} steps of {p.train.batch_size} token sequences → {out / 'distill'}")
    fit = train_transformer(p, out / "distill", distill=True, tokens=out / "shards", device=device, console=console)
    say(f"5/5 sample: {per_class} images of each class → {out / 'samples'}")
    models = load_models(out / "distill", device=device)
    run = sample_to_dir(models, list(range(len(DRAWN_CLASSES))), per_class, 0, models.preset.sample, out / "samples")
    return QuickstartResult(out, "drawn", tok_fit.metrics.get("psnr"), fit.metrics.get("student_ce"), run.grid)


def summary(res: QuickstartResult) -> List[str]:
    """The lines `fvar quickstart` ends with."""
    lines = []
    if res.table:
        lines += ["", res.table, ""]
        lines.append(f"report: {res.out / 'report.json'} · samples: {res.grid}")
        lines.append("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items())
                     + f" (total {sum(res.seconds.values()) / 60:.1f} min)")
    else:
        psnr = f"tokenizer PSNR {res.tokenizer_psnr:.1f} dB, " if res.tokenizer_psnr is not None else ""
        ce = f"student CE {res.student_ce:.3f}, " if res.student_ce is not None else ""
        lines.append(f"done ({res.dataset} images): {psnr}{ce}samples in {res.grid}")
    return lines

