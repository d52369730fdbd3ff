"""What sampling writes: one PNG per image, grids, per-scale token archives, JSON sidecars — for
`fvar sample` (`sample_to_dir`), `fvar eval` (`generate_to_folder`, resumable).
"""
from __future__ import annotations

import io
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from fvar_core.atomic import atomic_write_bytes, ensure_dir
from fvar_core.checks import check_labels
from fvar_core.config import SampleConfig
from fvar_core.errors import UserError
from fvar_core.data.images import save_png
from fvar_core.interrupt import mark_interrupt
from fvar_core.sample.loading import Models, class_names_for, load_models
from fvar_core.sample.sampler import sample

PathLike = Union[str, Path]

def slug(name: str, limit: int = 40) -> str:
    """A file-name-safe form of a class name ('tench, Tinca tinca' → 'tench-Tinca-tinca')."""
    s = re.sub(r"[^A-Za-z0-9_]+", "-", name).strip("-")
    return s[:limit].rstrip("-") or "class"


# ------------------------------------------------------------------------------------------------
# Grids and token files
# ------------------------------------------------------------------------------------------------

def make_grid(images: torch.Tensor, cols: int, pad: int = 2, fill: float = 1.0) -> torch.Tensor:
    """(N, 3, H, W) → (3, rows·(H+pad)+pad, cols·(W+pad)+pad), row-major, white padding."""
    N, C, H, W = images.shape
    cols = max(1, min(cols, N))
    rows = math.ceil(N / cols)
    grid = torch.full((C, rows * (H + pad) + pad, cols * (W + pad) + pad), fill, dtype=images.dtype)
    for i in range(N):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y:y + H, x:x + W] = images[i]
    return grid


def save_tokens(path: PathLike, tokens: Sequence[torch.Tensor], labels: Sequence[int], seeds: Sequence[int],
                patch_nums: Sequence[int]) -> None:
    """Per-scale tokens as .npz (atomically): tokens_k (N, pn_k²) int64, labels, seeds, patch_nums."""
    arrays = {f"tokens_{k}": t.cpu().numpy().astype(np.int64) for k, t in enumerate(tokens)}
    arrays.update(labels=np.asarray(labels, dtype=np.int64), seeds=np.asarray(seeds, dtype=np.int64),
                  patch_nums=np.asarray(patch_nums, dtype=np.int64))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def write_json(path: PathLike, doc: Dict[str, Any]) -> None:
    atomic_write_bytes(Path(path), (json.dumps(doc, indent=2) + "\n").encode())


# ------------------------------------------------------------------------------------------------
# Resumable folder generation (fvar eval)
# ------------------------------------------------------------------------------------------------

def progress_bar(total: int, initial: int = 0, enabled: bool = True):
    """(update(done), close()) over a rich bar on stderr, or no-ops."""
    if not enabled:
        return (lambda done: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    bar = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("sampling", total=total, completed=initial)
    bar.start()
    return (lambda done: bar.update(task, completed=done)), bar.stop


def generate_to_folder(var_ckpt: Path, out_dir: Path, labels: Sequence[int], seeds: Sequence[int],
                       settings: SampleConfig, *, batch_size: int = 32, tokenizer: Optional[Path] = None,
                       device: Optional[str] = None, progress: bool = True) -> List[Path]:
    """Image i (label labels[i], seed seeds[i]) → out_dir/{i:06d}.png, written atomically.

    Images already present are skipped, so a killed run resumes where it stopped (a PNG exists
    only once complete). Models are loaded only if something is missing. Returns all N paths."""
    out_dir = Path(out_dir)
    labels, seeds = [int(x) for x in labels], [int(x) for x in seeds]
    if len(labels) != len(seeds):
        raise UserError(f"{len(labels)} labels but {len(seeds)} seeds")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{i:06d}.png" for i in range(len(labels))]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if not todo:
        return paths
    models = load_models(var_ckpt, tokenizer, device)
    check_labels(labels, models.var.num_classes, "labels", allow_null=True)
    step = max(1, int(batch_size))
    update, close = progress_bar(len(paths), len(paths) - len(todo), progress)
    try:
        done = len(paths) - len(todo)
        for s in range(0, len(todo), step):
            part = todo[s:s + step]
            res = sample(models.var, models.tokenizer, [labels[i] for i in part], [seeds[i] for i in part],
                         settings, batch_size=step)
            for i, img in zip(part, res.images):
                save_png(img, paths[i])
            done += len(part)
            update(done)
    except KeyboardInterrupt as e:
        mark_interrupt(e, f"after {done} of {len(paths)} images in {out_dir} (finished images are kept and skipped "
                          f"on a rerun)")
        raise
    finally:
        close()
    return paths


# ------------------------------------------------------------------------------------------------
# `fvar sample`: a folder of images, a grid, a sidecar
# ------------------------------------------------------------------------------------------------

SEED_RULE = "image i (0-based, classes in the order given, n per class) has seed seed + i"
OFFICIAL_SEED_RULE = ("rng official: each batch of batch_size images is drawn from one generator seeded with "
                      "seed + the index of its first image (VAR's g_seed), as autoregressive_infer_cfg draws")


@dataclass
class SampleRun:
    """What `sample_to_dir` wrote."""

    out: Path
    files: List[Path]
    grid: Path
    sidecar: Path
    tokens: Optional[Path]
    seconds: float


def _class_label(c: int, num_classes: int, names: Optional[List[str]]) -> tuple[str, Optional[str]]:
    """(file-name part, class name or None) of class id c."""
    if c == num_classes:
        return "uncond", None
    name = names[c] if names is not None and c < len(names) else None
    return (f"class{c:04d}-{slug(name)}" if name else f"class{c:04d}"), name


GRID_MAX = 256  # grid.png shows at most this many images (the first ones)


def sample_to_dir(models: Models, classes: Sequence[int], n: int, seed: int, settings: SampleConfig,
                  out_dir: PathLike, *, batch_size: Optional[int] = None, tokens_file: Optional[PathLike] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> SampleRun:
    """n images of each class → out_dir: one PNG per image (written as each chunk is done, so
    memory does not grow with N and a kill keeps the finished ones), grid.png (the first
    GRID_MAX; one row per class when n ≤ 16), samples.json (every setting, checkpoint and
    tokenizer identity, per-image class and seed), and optionally the per-scale tokens as .npz.
    Seeds: SEED_RULE. Output paths are checked before anything is sampled."""
    out_dir = ensure_dir(Path(out_dir), "--out")
    tok_path = Path(tokens_file) if tokens_file is not None else None
    if tok_path is not None:
        if tok_path.is_dir():
            raise UserError(f"--save-tokens {tok_path} is a folder; give the .npz file to write")
        ensure_dir(tok_path.parent, "--save-tokens folder")
    num_classes = models.var.num_classes
    names = class_names_for(models.var_ckpt.path)
    labels = [int(c) for c in classes for _ in range(n)]
    seeds = [seed + i for i in range(len(labels))]
    if seeds and seeds[-1] >= 2 ** 63:
        raise UserError(f"--seed {seed}: seed + {len(labels) - 1} exceeds 2^63 - 1")
    check_labels(labels, num_classes, "labels", allow_null=True)

    chunk = max(1, int(batch_size or settings.batch_size))
    files, entries, token_parts, shown = [], [], [], []
    t0 = time.perf_counter()
    try:
        for lo in range(0, len(labels), chunk):
            hi = min(len(labels), lo + chunk)
            res = sample(models.var, models.tokenizer, labels[lo:hi], seeds[lo:hi], settings, batch_size=chunk,
                         refiner=models.refiner)
            for i, img in zip(range(lo, hi), res.images):
                part, name = _class_label(labels[i], num_classes, names)
                path = out_dir / f"{i:04d}-{part}.png"
                save_png(img, path)
                files.append(path)
                entries.append({"file": path.name, "index": i, "class": labels[i], "class_name": name,
                                "unconditional": labels[i] == num_classes, "seed": seeds[i]})
            token_parts.append(res.tokens)
            shown.extend(res.images[:max(0, GRID_MAX - len(shown))])
            if progress is not None:
                progress(hi, len(labels))
    except KeyboardInterrupt as e:
        mark_interrupt(e, f"after {len(files)} of {len(labels)} images in {out_dir} (a rerun draws them again, "
                          f"identically: every image has its own seed)")
        raise
    seconds = time.perf_counter() - t0

    cols = n if (len(classes) > 1 and n <= 16) else math.ceil(math.sqrt(len(shown)))
    grid = out_dir / "grid.png"
    save_png(make_grid(torch.stack(shown), cols), grid)
    if tok_path is not None:
        tokens = [torch.cat([t[k] for t in token_parts]) for k in range(len(models.var.patch_nums))]
        save_tokens(tok_path, tokens, labels, seeds, models.var.patch_nums)
    sidecar = out_dir / "samples.json"
    write_json(sidecar, {
        "format": "fvar-samples", "version": 1,
        "checkpoint": models.identity["checkpoint"], "tokenizer": models.identity["tokenizer"],
        "refiner": models.identity.get("refiner"),
        "settings": {**settings.model_dump(mode="json"), "seed": seed, "n_per_class": n,
                     "classes": [int(c) for c in classes], "batch_size": chunk, "device": str(models.device)},
        "seed_rule": SEED_RULE if settings.rng == "per-image" else OFFICIAL_SEED_RULE, "resolution": models.preset.resolution,
        "patch_nums": list(models.var.patch_nums), "grid": grid.name, "grid_images": len(shown),
        "tokens": str(tok_path) if tok_path else None, "seconds": round(seconds, 3), "images": entries})
    return SampleRun(out_dir, files, grid, sidecar, tok_path, seconds)
