"""`fvar release train`: the recipe of the models that ship inside fvar, from the IDX files.

One folder, resumable step by step (a rerun skips what is finished; a killed step resumes from its
last checkpoint):

    OUT/data/                      fvar data fashion-mnist (32 px)
    OUT/classifier/                the feature network every model is scored with (bundled as `fmnist`)
    OUT/<model>/tokenizer/         fvar train-tokenizer --preset <recipe preset>
    OUT/<model>/shards/            fvar tokenize: the first `train_per_class` train images per class
    OUT/<model>/transformer/       fvar distill (FVAR) or fvar train (the VAR twin)
    OUT/<model>/samples/           fvar eval --feature-net: 100 samples per class, against the test split
    OUT/<model>/report.json        the evaluation, plus each step's wall time

`fvar release pack OUT` then copies the weights into the package (`models.bundled`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

from fvar_core.data.fashion_mnist import export
from fvar_core.data.tokenize import tokenize_folder
from fvar_core.errors import UserError
from fvar_core.eval.classifier import ClassifierConfig, train_classifier
from fvar_core.eval.evaluate import write_report
from fvar_core.eval.feature_metrics import feature_evaluation, format_table
from fvar_core.presets import load_preset
from fvar_core.train.tokenizer import train_tokenizer
from fvar_core.train.transformer import train_transformer

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Recipe:
    """How one bundled model is trained: its preset, FVAR (distill) or VAR (train), and how many
    train images per class are tokenized for the transformer."""

    preset: str
    distill: bool
    train_per_class: int
    summary: str


# Tokenizing costs ~15 ms per image on two cores (5 encoder passes for FVAR); 2,500 per class give
# 25,000 sequences, each seen ~1.8× by the presets' 1,400 steps × 32.
RECIPES: Dict[str, Recipe] = {
    "fmnist-32": Recipe("fmnist-32-release", True, 2500,
                        "FVAR: disk focus pyramid, dual tokenizer, teacher distilled into the VAR student"),
    "fmnist-32-var": Recipe("fmnist-32-release-var", False, 2500,
                            "VAR twin: area pyramid, one codebook, fvar train (same sizes, data and steps)"),
}
CLASSIFIER = ClassifierConfig(epochs=2.0, resolution=32)
SAMPLES_PER_CLASS = 100


def recipe_command(name: str) -> str:
    """The command that trains `name` (what its model card records)."""
    return f"fvar release train {name} --out release"


def train_release(out: PathLike, names: Sequence[str] = tuple(RECIPES), *, source: Optional[PathLike] = None,
                  download: bool = False, device: Optional[str] = None, console: Any = None,
                  say: Callable[[str], None] = print) -> Dict[str, Dict[str, Any]]:
    """Train (or resume) the named recipes in `out`; returns each one's report (see the module docstring)."""
    bad = [n for n in names if n not in RECIPES]
    if bad:
        raise UserError(f"unknown release {bad[0]!r}: choose from {', '.join(RECIPES)}")
    out = Path(out)
    t = time.perf_counter()
    data = out / "data"
    say(f"data: Fashion-MNIST → {data}")
    export(data, source=source, size=32, allow_download=download, say=lambda s: say(f"    {s}"))
    clf_dir = out / "classifier"
    if not (clf_dir / "config.json").is_file():
        say(f"classifier: {CLASSIFIER.epochs:g} epochs → {clf_dir}")
        res = train_classifier(data / "train", clf_dir, CLASSIFIER, val=data / "test", device=device,
                               say=lambda s: say(f"    {s}"))
        say(f"    test accuracy {100 * res.val_accuracy:.2f}%")
    shared = time.perf_counter() - t
    return {n: _train_one(out, n, RECIPES[n], shared, device=device, console=console, say=say) for n in names}


def _timed(times: Dict[str, float], key: str, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    res = fn()
    times[key] = round(time.perf_counter() - t, 1)
    return res


def _train_one(out: Path, name: str, r: Recipe, shared_seconds: float, *, device, console, say) -> Dict[str, Any]:
    p = load_preset(r.preset)
    d = out / name
    report_path = d / "report.json"
    if report_path.is_file():
        say(f"{name}: finished ({report_path})")
        return json.loads(report_path.read_text(encoding="utf-8"))
    # Wall time per step, kept across resumes (a resumed step adds the time of its new part).
    times_path = d / "seconds.json"
    times: Dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    d.mkdir(parents=True, exist_ok=True)
    data = out / "data"

    def step(key: str, line: str, fn: Callable[[], Any]) -> Any:
        say(f"{name} · {line}")
        before = times.get(key, 0.0)
        res = _timed(times, key, fn)
        times[key] = round(times[key] + before, 1)
        times_path.write_text(json.dumps(times, indent=1) + "\n", encoding="utf-8")
        return res

    step("train-tokenizer", f"train-tokenizer: {p.tokenizer_train.steps} steps × {p.tokenizer_train.batch_size}",
         lambda: train_tokenizer(p, data / "train", d / "tokenizer", device=device, console=console))
    step("tokenize", f"tokenize: {r.train_per_class} train images per class",
         lambda: tokenize_folder(d / "tokenizer", data / "train", d / "shards", per_class=r.train_per_class,
                                 batch_size=128, device=device or "auto"))
    mode = "distill" if r.distill else "train"
    step(mode, f"{mode}: {p.train.steps} steps × {p.train.batch_size} token sequences",
         lambda: train_transformer(p, d / "transformer", distill=r.distill, tokens=d / "shards", device=device,
                                   console=console))
    report = step("evaluate", f"evaluate: {SAMPLES_PER_CLASS} samples per class against the test split",
                  lambda: feature_evaluation(out / "classifier", data / "test", ckpt=d / "transformer",
                                             per_class=SAMPLES_PER_CLASS, out=d / "samples", real=data / "train",
                                             device=device, show_progress=False))
    report["recipe"] = {"name": name, "preset": r.preset, "distill": r.distill,
                        "train_per_class": r.train_per_class, "command": recipe_command(name),
                        "seconds": {**times, "data+classifier (shared)": round(shared_seconds, 1)}}
    write_report(report, report_path)
    (d / "report.md").write_text(format_table(report) + "\n", encoding="utf-8")
    return report
