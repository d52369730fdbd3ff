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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

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
        t = time.perf_counter()
        res = fn()
        times[key] = round(times.get(key, 0.0) + time.perf_counter() - t, 1)
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


# ------------------------------------------------------------------------------------------ pack
CLASSIFIER_NAME = "fmnist"
DEFAULT = "fmnist-32"


def _half(state_dict: Dict[str, "torch.Tensor"]) -> Dict[str, "torch.Tensor"]:
    """Floating tensors as float16 (the bundle's storage; loading upcasts into the float32 model)."""
    import torch

    out = {}
    for k, v in state_dict.items():
        if v.is_floating_point():
            finite = v[torch.isfinite(v)]  # masks hold −inf, which float16 holds too
            if finite.numel() and finite.abs().max() > torch.finfo(torch.float16).max:
                raise UserError(f"{k} exceeds float16's range: it cannot be bundled in half precision")
            v = v.half()
        out[k] = v
    return out


def _rows(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The evaluation's rows, the numbers only (samples, real images, reconstructions)."""
    keep = ("name", "accuracy", "fid", "precision", "recall", "psnr")
    return [{**{k: r[k] for k in keep if k in r}, "n": r.get("count"), "kid": r.get("kid", {}).get("mean")}
            for r in report.get("rows", [])]


def _portable(provenance: Dict[str, Any], out: Path) -> Dict[str, Any]:
    """Provenance with the data paths of this machine's release folder written as `release/…` (the
    recipe's default --out): the fingerprints identify the data, the paths only say where it was."""
    root = str(out.resolve())

    def rel(v: Any) -> Any:
        return f"release{v[len(root):]}" if isinstance(v, str) and v.startswith(root) else v

    prov = {k: rel(v) for k, v in provenance.items()}
    if isinstance(prov.get("data_identity"), dict):
        prov["data_identity"] = {k: rel(v) for k, v in prov["data_identity"].items()}
    return prov


def pack_release(out: PathLike, dest: Optional[PathLike] = None, names: Sequence[str] = tuple(RECIPES),
                 say: Callable[[str], None] = print) -> Path:
    """Copy the trained release in `out` into the bundle folder `dest` (default `bundle.BUNDLE_DIR`):
    each transformer (float16) with its tokenizer (float16) and class names, the classifier (float32,
    tiny), model cards with the evaluation and the recipe, and manifest.json with every file's sha256."""
    from fvar_core.bundle import BUNDLE_DIR, FORMAT, MANIFEST_NAME, VERSION
    from fvar_core.checkpoints import load_checkpoint, save_checkpoint
    from fvar_core.classnames import display_name
    from fvar_core.data.folders import read_class_index, write_class_index
    from fvar_core.hashing import file_sha256, tensors_sha256
    from fvar_core.runs import CLASS_INDEX, TOKENIZER_DIR, find_tokenizer, resolve_checkpoint

    out = Path(out)
    if not (out / "data" / CLASS_INDEX).is_file():
        raise UserError(f"{out} is not a release folder (no data/{CLASS_INDEX}): `fvar release train --out {out}` "
                        f"writes one")
    dest = Path(dest) if dest is not None else BUNDLE_DIR
    # the class list the models and the classifier were trained with (the export's folder names,
    # '7-sneaker': what evaluation matches classes by); cards show them as names ('sneaker')
    class_names = read_class_index(out / "data" / CLASS_INDEX)
    shown = [display_name(c) for c in class_names]
    models: Dict[str, Any] = {}
    for name in names:
        report_path = out / name / "report.json"
        if not report_path.is_file():
            raise UserError(f"{out / name} is not finished (no report.json): run `fvar release train {name}` first")
        report = json.loads(report_path.read_text(encoding="utf-8"))
        var = load_checkpoint(resolve_checkpoint(out / name / "transformer", "--ckpt"), expect_kind="var")
        tok = load_checkpoint(find_tokenizer(var.path, var.provenance), expect_kind="tokenizer")
        release = {"name": name, "summary": RECIPES[name].summary, "recipe": recipe_command(name),
                   "precision": "float16", "evaluation": _rows(report),
                   "seconds": report.get("recipe", {}).get("seconds"), "classifier": CLASSIFIER_NAME}
        folder = dest / name
        shutil.rmtree(folder, ignore_errors=True)
        for ck, d in ((var, folder), (tok, folder / TOKENIZER_DIR)):  # the tokenizer inside the var folder
            trained = tensors_sha256(ck.state_dict)
            prov = {**_portable(ck.provenance, out), "release": {**release, "trained_tensors_sha256": trained}}
            save_checkpoint(d, kind=ck.kind, preset=ck.preset, state_dict=_half(ck.state_dict), provenance=prov,
                            classes=shown)
        write_class_index(folder / CLASS_INDEX, class_names)
        models[name] = {"kind": "var", "path": name, "summary": RECIPES[name].summary, "precision": "float16",
                        "recipe": recipe_command(name), "evaluation": release["evaluation"]}
        say(f"{name}: step {var.provenance.get('step')} → {folder}")
    clf = load_checkpoint(out / "classifier", expect_kind="classifier")
    clf_dir = dest / CLASSIFIER_NAME
    shutil.rmtree(clf_dir, ignore_errors=True)
    clf_summary = "the feature network of fvar eval --feature-net for Fashion-MNIST at 32 px"
    accuracy = clf.extra.get("metrics", {}).get("val_accuracy")
    save_checkpoint(clf_dir, kind="classifier", preset=None, state_dict=clf.state_dict, extra=clf.extra,
                    provenance={**_portable(clf.provenance, out), "metrics": {"test_accuracy": accuracy},
                                "release": {"name": CLASSIFIER_NAME, "summary": clf_summary,
                                            "recipe": "fvar release train --out release", "precision": "float32"}},
                    classes=shown)
    models[CLASSIFIER_NAME] = {"kind": "classifier", "path": CLASSIFIER_NAME, "precision": "float32",
                               "summary": clf_summary, "recipe": "fvar release train --out release",
                               "test_accuracy": accuracy}
    for name, entry in models.items():
        files = sorted(p for p in (dest / entry["path"]).rglob("*") if p.is_file())
        entry["files"] = {p.relative_to(dest).as_posix(): file_sha256(p) for p in files}
    manifest = {"format": FORMAT, "version": VERSION, "default": DEFAULT, "models": models}
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    total = sum((dest / rel).stat().st_size for e in models.values() for rel in e["files"])
    say(f"bundle: {len(models)} models, {total / 1e6:.1f} MB → {dest}")
    return dest
