"""`fvar experiment ablation`: the paper's Table 3 rows at small scale, at equal budget, ≥ 3 seeds.

    var              VAR: area pyramid, plain tokenizer (no alias codebook), student alone
    fvar-no-teacher  FVAR tokens (disk PSF, dual tokenizer), student alone        (paper: w/o teacher)
    fvar-gaussian    Gaussian PSF in place of the disk, teacher distillation       (paper: w/ Gaussian)
    fvar             disk PSF + dual tokenizer + teacher distillation              (paper: full)
    fvar-shared      alias residuals coded with the structure codebook, teacher    (paper: w/o dual)

Every row trains its tokenizer (rows with the same tokenizer settings and seed share one), its
transformer for the same steps × batch, then samples `samples_per_class` images per class and is
scored in one classifier's feature space (`feature_metrics`): class-conditional accuracy,
feature-FID, precision/recall; plus the student's per-scale CE on held-out test tokens and the
generated images' alias leakage against real test images (`alias.image_leakage`, in dB).

Layout of OUT (each step resumes by its own logic; a finished cell is never recomputed):

    data/ classifier/                    shared by every cell
    tokenizers/<tokenizer>/seed-<s>/     run, shards-train/, shards-test/
    cells/<row>/seed-<s>/                run/ (transformer), samples/, result.json (the cell is done)
    results.json  table.md  ablation.png  samples-seed<s>.png (a band of samples per row)
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from fvar_core.errors import UserError
from fvar_core.atomic import atomic_write_bytes
from fvar_core.data.images import load_image, save_png
from fvar_core.data.tokenize import tokenize_folder
from fvar_core.devices import pick_device
from fvar_core.eval.classifier import ClassifierConfig, labelled_folder, train_classifier
from fvar_core.eval.evaluate import write_report
from fvar_core.eval.feature_metrics import feature_evaluation, sample_set
from fvar_core.focus.alias import image_leakage
from fvar_core.pipelines.alias_audit import cross_entropy_report
from fvar_core.presets import load_preset
from fvar_core.sample.outputs import make_grid
from fvar_core.train.tokenizer import train_tokenizer
from fvar_core.train.transformer import train_transformer
from fvar_core.data.fashion_mnist import export

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Row:
    label: str
    tokenizer: str                    # key into TOKENIZERS
    overrides: Tuple[str, ...]        # preset changes of the transformer run, on top of its tokenizer's
    distill: bool


TOKENIZERS: Dict[str, Tuple[str, ...]] = {
    "area": ("pyramid.kernel=area", "tokenizer.alias_vocab_size=0", "teacher.enabled=false"),
    "disk": (),
    "gaussian": ("pyramid.kernel=gaussian",),
    "shared": ("tokenizer.alias_vocab_size=0", "tokenizer.shared_codebook=true"),
    "disk-focus-grad": ("tokenizer_train.focus_grad=true",),
}

ROWS: Dict[str, Row] = {
    "var": Row("VAR (area pyramid, plain tokenizer)", "area", (), False),
    "fvar-no-teacher": Row("FVAR w/o teacher (disk, dual tokenizer)", "disk", ("teacher.enabled=false",), False),
    "fvar-gaussian": Row("FVAR w/ Gaussian PSF (+ teacher)", "gaussian", (), True),
    "fvar": Row("FVAR full (disk + teacher distillation)", "disk", (), True),
    "fvar-shared": Row("FVAR shared codebook (+ teacher)", "shared", (), True),
    # Not a paper row: the alias audit's question (docs/alias-audit.md) — the full FVAR with the
    # commitment gradient through the blurred views' encodes, as the paper presets train it.
    "fvar-focus-grad": Row("FVAR full, tokenizer with focus_grad on", "disk-focus-grad", (), True),
}
DEFAULT_ROWS = ("var", "fvar-no-teacher", "fvar-gaussian", "fvar", "fvar-shared")


@dataclass(frozen=True)
class Budget:
    """What every cell gets: the same steps × batch for every row (the preset's batch sizes)."""

    preset: str
    tokenizer_steps: int
    steps: int
    train_per_class: int      # train images per class tokenized for the transformer
    test_per_class: int       # held-out test images per class for the student's CE
    samples_per_class: int
    classifier_epochs: float


# Sized on the 2-core machine of docs/experiments.md: 5 rows × 3 seeds in about 80 minutes.
BUDGETS: Dict[str, Budget] = {
    "cpu": Budget("fmnist-32", tokenizer_steps=350, steps=250, train_per_class=256, test_per_class=50,
                  samples_per_class=50, classifier_epochs=2.0),
    "gpu": Budget("fmnist-32-gpu", tokenizer_steps=5000, steps=5000, train_per_class=6000, test_per_class=1000,
                  samples_per_class=500, classifier_epochs=10.0),
}

METRICS = ("accuracy", "fid", "precision", "recall", "student_ce", "alias_db")


def _overrides(budget: Budget, seed: int) -> List[str]:
    t, s = budget.tokenizer_steps, budget.steps
    return [f"tokenizer_train.steps={t}", f"tokenizer_train.ckpt_every={t}", "tokenizer_train.sample_every=0",
            f"tokenizer_train.seed={seed}", f"train.steps={s}", f"train.ckpt_every={s}", "train.sample_every=0",
            f"train.seed={seed}"]


def _mean_leak(x_uint8, patch_nums, resolution) -> float:
    """Mean over images and scales of `alias.image_leakage` (a fraction of the image energy)."""
    return float(image_leakage(x_uint8.double() / 255.0, patch_nums, resolution).mean())


def run_cell(out: Path, row_name: str, seed: int, budget: Budget, *, base_overrides: Sequence[str] = (),
             device: Optional[str] = None, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train and evaluate one (row, seed); returns (and writes) cells/<row>/seed-<s>/result.json."""
    row = ROWS[row_name]
    cell = out / "cells" / row_name / f"seed-{seed}"
    done = cell / "result.json"
    if done.is_file():  # run_ablation's experiment.json pins one budget per folder
        return json.loads(done.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    train, test = out / "data" / "train", out / "data" / "test"
    common = [*base_overrides, *_overrides(budget, seed)]
    tok_dir = out / "tokenizers" / row.tokenizer / f"seed-{seed}"
    tok_preset = load_preset(budget.preset, [*common, *TOKENIZERS[row.tokenizer]])
    say(f"  tokenizer {row.tokenizer} seed {seed}: {budget.tokenizer_steps} steps → {tok_dir / 'run'}")
    train_tokenizer(tok_preset, train, tok_dir / "run", device=device)
    for split, folder, n in (("train", train, budget.train_per_class), ("test", test, budget.test_per_class)):
        tokenize_folder(tok_dir / "run", folder, tok_dir / f"shards-{split}", per_class=n, batch_size=128,
                        device=device or "auto")  # a finished shard folder is kept as it is
    p = load_preset(budget.preset, [*common, *TOKENIZERS[row.tokenizer], *row.overrides])
    say(f"  {row_name} seed {seed}: {'distill' if row.distill else 'train'} {budget.steps} steps → {cell / 'run'}")
    train_transformer(p, cell / "run", distill=row.distill, tokens=tok_dir / "shards-train",
                      save_teacher=row.distill, device=device)
    report = feature_evaluation(out / "classifier", test, ckpt=cell / "run", per_class=budget.samples_per_class,
                                out=cell / "samples", seed=seed, device=device, show_progress=False)
    ce = cross_entropy_report(cell / "run", tok_dir / "shards-test", device=str(pick_device(device or "auto")))
    s = report["rows"][0]
    gen_set = sample_set(cell / "samples", None, p.resolution)
    real_leak = _real_leak(out, p, budget.samples_per_class)
    leak = _mean_leak(gen_set.images, p.patch_nums, p.resolution)
    result = {
        "row": row_name, "label": row.label, "seed": seed, "tokenizer": row.tokenizer, "distill": row.distill,
        "budget": budget.__dict__, "base_overrides": list(base_overrides),
        "accuracy": s["accuracy"], "fid": s["fid"], "kid": s["kid"]["mean"], "precision": s["precision"],
        "recall": s["recall"], "samples": s["count"], "accuracy_per_class": s.get("accuracy_per_class"),
        **{f"{net}_ce{suffix}": (ce.get(net) or {}).get(part) for net in ("student", "teacher", "teacher_shuffled")
           for suffix, part in (("", "mean"), ("_per_scale", "per_scale"))},
        "leak_generated": leak, "leak_real": real_leak, "alias_db": 10.0 * math.log10(leak / real_leak),
        "feature_net_sha256": report["feature_net"]["weights_sha256"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_report(result, done)
    return result


def _real_leak(out: Path, preset, per_class: int) -> float:
    """The real images' leakage (the first `per_class` test images of each class), cached."""
    path = out / "real-leak.json"
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("per_class") == per_class:
            return float(doc["leak"])
    images, _, _, _ = labelled_folder(out / "data" / "test", preset.resolution, per_class=per_class)
    leak = _mean_leak(images, preset.patch_nums, preset.resolution)
    write_report({"per_class": per_class, "leak": leak, "images": len(images)}, path)
    return leak


def _prepare(out: Path, budget: Budget, *, data: Optional[PathLike], source: Optional[PathLike],
             download: bool, data_per_class: Optional[int], device: Optional[str], say: Callable[[str], None]) -> None:
    """OUT/data (Fashion-MNIST, or a copy-free link to `data` with train/ and test/) and OUT/classifier."""
    res = load_preset(budget.preset).resolution
    d = out / "data"
    if data is not None:
        data = Path(data).resolve()
        for split in ("train", "test"):
            if not (data / split).is_dir():
                raise UserError(f"--data {data}: needs train/ and test/ image folders (fvar data fashion-mnist "
                                f"writes them)")
        if not d.exists():
            out.mkdir(parents=True, exist_ok=True)
            d.symlink_to(data, target_is_directory=True)
        elif d.resolve() != data:
            raise UserError(f"{out} was started on the data in {d.resolve()}, not {data}: use another --out")
    else:
        say(f"data: Fashion-MNIST → {d}")
        export(d, source=source, size=res, per_class=data_per_class, allow_download=download,
               say=lambda s: say(f"  {s}"))
    clf = out / "classifier"
    if not (clf / "config.json").is_file():
        say(f"classifier: {budget.classifier_epochs:g} epochs on {d / 'train'} → {clf}")
        r = train_classifier(d / "train", clf, ClassifierConfig(epochs=budget.classifier_epochs, resolution=res),
                             val=d / "test", device=device, say=lambda s: say(f"  {s}"))
        say(f"  test accuracy {100 * r.val_accuracy:.2f}%")


def run_ablation(out: PathLike, *, rows: Sequence[str] = DEFAULT_ROWS, seeds: Sequence[int] = (0, 1, 2),
                 budget: Union[str, Budget] = "cpu", base_overrides: Sequence[str] = (),
                 data: Optional[PathLike] = None, source: Optional[PathLike] = None, download: bool = False,
                 data_per_class: Optional[int] = None, device: Optional[str] = None,
                 say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every (row, seed) cell not yet done, seed-major (so a cut-off run has whole seeds), then the
    summary of every finished cell in OUT (these and earlier ones, rows in ROWS order):
    results.json, table.md, ablation.png. Returns the summary."""
    out = Path(out)
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise UserError(f"unknown ablation row {bad[0]!r}: choose from {', '.join(ROWS)}")
    if not rows or not seeds:
        raise UserError("nothing to run: give at least one row and one seed")
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise UserError(f"unknown --size {budget!r}: choose {' or '.join(BUDGETS)}")
        budget = BUDGETS[budget]
    settings = {"budget": budget.__dict__, "base_overrides": list(base_overrides)}
    marker = out / "experiment.json"
    if marker.is_file():
        were = json.loads(marker.read_text(encoding="utf-8"))
        if were != json.loads(json.dumps(settings)):
            raise UserError(f"{out} holds an experiment with another budget or --set overrides "
                            f"({were['budget']}, {were['base_overrides']}): use another --out, or the same settings")
    _prepare(out, budget, data=data, source=source, download=download, data_per_class=data_per_class,
             device=device, say=say)
    if not marker.is_file():  # after the data check: a mistyped first attempt does not pin the folder
        write_report(settings, marker)
    total = len(rows) * len(seeds)
    for i, (seed, row) in enumerate((s, r) for s in seeds for r in rows):
        done = (out / "cells" / row / f"seed-{seed}" / "result.json").is_file()
        say(f"[{i + 1}/{total}] {row} seed {seed}" + (" (done)" if done else ""))
        res = run_cell(out, row, seed, budget, base_overrides=base_overrides, device=device, say=say)
        if not done:
            say(f"  accuracy {100 * res['accuracy']:.1f}%, feature FID {res['fid']:.2f}, student CE "
                f"{res['student_ce']:.3f}, alias {res['alias_db']:+.2f} dB ({res['seconds']:.0f} s)")
    results = [json.loads(f.read_text(encoding="utf-8")) for r in ROWS
               for f in sorted((out / "cells" / r).glob("seed-*/result.json"), key=lambda f: int(f.parent.name[5:]))]
    summary = summarize(results, [r for r in ROWS if any(x["row"] == r for x in results)])
    summary["budget"] = budget.__dict__
    summary["base_overrides"] = list(base_overrides)
    write_report(summary, out / "results.json")
    atomic_write_bytes(out / "table.md", (format_table(summary) + "\n").encode())
    plot(summary, out / "ablation.png")
    sample_sheet(out, out / f"samples-seed{seeds[0]}.png", seed=seeds[0])
    return summary


def _stats(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarize(results: Sequence[Dict[str, Any]], rows: Sequence[str]) -> Dict[str, Any]:
    """Mean ± sample std (N−1) over seeds of every metric, per row (in `rows` order)."""
    out_rows = []
    for r in rows:
        mine = [x for x in results if x["row"] == r]
        if not mine:
            continue
        entry: Dict[str, Any] = {"row": r, "label": ROWS[r].label, "seeds": [x["seed"] for x in mine]}
        for m in (*METRICS, "kid", "teacher_ce", "teacher_shuffled_ce"):
            entry[m] = _stats([x.get(m) for x in mine])
        for m in ("student_ce_per_scale", "teacher_ce_per_scale", "teacher_shuffled_ce_per_scale"):
            per = [x[m] for x in mine if x.get(m)]
            entry[m] = [_stats(col) for col in zip(*per)] if per else None
        out_rows.append(entry)
    return {"format": "fvar-ablation", "version": 1, "rows": out_rows, "cells": list(results)}


def _pm(s: Optional[Dict[str, float]], scale: float = 1.0, digits: int = 2) -> str:
    if s is None:
        return "–"
    if s["n"] < 2:  # one seed: no spread to show
        return f"{scale * s['mean']:.{digits}f}"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def format_table(summary: Dict[str, Any]) -> str:
    """The markdown tables of docs/experiments.md: metrics, then per-scale student CE."""
    lines = ["| row | seeds | class acc % ↑ | feature FID ↓ | precision ↑ | recall ↑ | student CE ↓ | "
             "teacher CE (true / shuffled alias) | alias Δ dB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        teacher = (f"{_pm(r['teacher_ce'], digits=3)} / {_pm(r['teacher_shuffled_ce'], digits=3)}"
                   if r.get("teacher_ce") else "–")
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {_pm(r['accuracy'], 100, 1)} | {_pm(r['fid'])} | "
                     f"{_pm(r['precision'], digits=3)} | {_pm(r['recall'], digits=3)} | "
                     f"{_pm(r['student_ce'], digits=3)} | {teacher} | {_pm(r['alias_db'])} |")
    per = [r for r in summary["rows"] if r.get("student_ce_per_scale")]
    if per:
        K = len(per[0]["student_ce_per_scale"])
        lines += ["", "Student CE per scale (nats per token, held-out test tokens; mean ± std over seeds):", "",
                  "| row | " + " | ".join(f"k={k + 1}" for k in range(K)) + " |",
                  "|---|" + "---|" * K]
        for r in per:
            lines.append(f"| {r['row']} | " + " | ".join(_pm(s, digits=3) for s in r["student_ce_per_scale"]) + " |")
    return "\n".join(lines)


def plot(summary: Dict[str, Any], path: PathLike) -> Optional[Path]:
    """ablation.png: one panel per metric (mean ± std over seeds, each seed a grey dot) and the per-scale
    student CE. None (with nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = summary["rows"]
    names = [r["row"] for r in rows]
    panels = [("accuracy", "class-conditional accuracy (%)", 100.0), ("fid", "feature FID (lower is better)", 1.0),
              ("precision", "precision", 1.0), ("recall", "recall", 1.0),
              ("alias_db", "alias leakage, generated vs real (dB)", 1.0)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (key, title, scale) in zip(axes.flat, panels):
        means = [scale * r[key]["mean"] if r[key] else np.nan for r in rows]
        stds = [scale * r[key]["std"] if r[key] else 0.0 for r in rows]
        # Points, not bars: the axis fits the data, so differences of a few percent stay visible.
        for i, r in enumerate(rows):
            vals = [scale * c[key] for c in summary["cells"] if c["row"] == r["row"] and c.get(key) is not None]
            ax.plot([i + 0.12] * len(vals), vals, ".", color="0.55", ms=5)
        ax.errorbar(range(len(rows)), means, yerr=stds, fmt="o", capsize=4, color="#2b5d8a")
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(range(len(rows)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    ax = axes.flat[5]
    for r in rows:
        per = r.get("student_ce_per_scale")
        if per:
            ax.errorbar(range(1, len(per) + 1), [s["mean"] for s in per], yerr=[s["std"] for s in per],
                        marker="o", ms=3, capsize=2, label=r["row"])
    ax.set_xlabel("scale k")
    ax.set_title("student CE per scale (test tokens)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def sample_sheet(out: PathLike, path: PathLike, *, seed: int = 0, per_class: int = 4,
                 rows: Optional[Sequence[str]] = None, zoom: int = 2) -> Path:
    """One PNG to look at the rows side by side: a band per ablation row (top to bottom, black
    lines between), in each the first `per_class` samples of every class of seed `seed` (classes
    left to right), enlarged `zoom` × with nearest-neighbour so pixels stay pixels."""
    import torch

    out = Path(out)
    rows = [r for r in (rows or ROWS) if (out / "cells" / r / f"seed-{seed}" / "result.json").is_file()]
    if not rows:
        raise UserError(f"{out}: no finished cell of seed {seed}")
    bands = []
    for r in rows:
        res = json.loads((out / "cells" / r / f"seed-{seed}" / "result.json").read_text(encoding="utf-8"))
        spc = res["budget"]["samples_per_class"]
        n_cls = res["samples"] // spc
        folder = out / "cells" / r / f"seed-{seed}" / "samples"
        imgs = [load_image(folder / f"{c * spc + i:06d}.png") for i in range(min(per_class, spc)) for c in range(n_cls)]
        bands.append(make_grid(torch.stack(imgs), n_cls, pad=1))
    sep = torch.zeros(3, 4, bands[0].shape[2])
    sheet = torch.cat([x for b in bands for x in (b, sep)][:-1], dim=1)
    sheet = sheet.repeat_interleave(zoom, dim=1).repeat_interleave(zoom, dim=2)
    save_png(sheet, Path(path))
    return Path(path)
