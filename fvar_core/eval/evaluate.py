"""`fvar eval`: samples (a folder, or generated from a checkpoint) → Inception features → metrics,
reported as JSON with every number, the whole protocol (docs/design.md §9, docs/var-compat.md §4).

    samples folder ──imagesets──▶ uint8 batches ──features──▶ pool3 / logits ──metrics──▶ report
    reference spec ──refstats──▶ μ, Σ (+ pool3 set for KID, P/R)  ───────────────────────▶

Also the tokenizer's reconstruction figures (PSNR, SSIM, rFID) and the pyramid's alias figures
averaged over a folder. Definitions of every metric: `metrics.py`; the extractor and its
resize: `features.py`; reference statistics: `refstats.py`.

Checkpoint evaluation generates N = classes × per_class images, class c taking images
c·per_class … (c+1)·per_class − 1 (VAR's 50 per class for 1000 classes) and image i the seed
`seed + i`, into a folder via `sample_outputs.generate_to_folder`, which skips finished images — so a
killed run resumes. The folder's `generation.json` records what generated it; a rerun with other
settings or another checkpoint into the same folder is refused rather than mixed.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from fvar_core.errors import UserError
from fvar_core.eval.features import InceptionFeatures, extract_batch
from fvar_core.eval.imagesets import FileSet, read_files, samples_folder
from fvar_core.eval.metrics import (FID_EPS, IS_SPLITS, KID_SUBSETS, KID_SUBSET_SIZE, PR_K, RunningStats, SEED,
                                    frechet_distance, inception_score, kernel_inception_distance, precision_recall,
                                    psnr, ssim)
from fvar_core.eval.refstats import check_reference, feature_pass, open_reference, subset_indices
from fvar_core.atomic import atomic_write_bytes, ensure_dir
from fvar_core.checkpoints import WEIGHTS_NAME, load_checkpoint, read_checkpoint_config
from fvar_core.data.folders import check_folder, ImageFolderDataset, scan_image_folder
from fvar_core.data.images import fit_square, load_image
from fvar_core.focus.alias import alias_report
from fvar_core.hashing import file_sha256
from fvar_core.models.loading import build_tokenizer
from fvar_core.presets import validate as validate_preset
from fvar_core.runs import find_tokenizer, newest_checkpoint, resolve_checkpoint, runs_dir
from fvar_core.sample.outputs import generate_to_folder, write_json
from fvar_core.sample.sampler import settings_from

REPORT_FORMAT = "fvar-eval"
REPORT_VERSION = 1
ALL_METRICS = ("fid", "isc", "kid", "prc")
GENERATION_NAME = "generation.json"

PathLike = Union[str, Path]
# progress(stage, done, total)
Progress = Callable[[str, int, int], None]


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def parse_metrics(text: str) -> Tuple[str, ...]:
    """'fid,isc' → ('fid', 'isc'), in the canonical order; unknown names are a UserError."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ALL_METRICS]
    if bad or not names:
        raise UserError(f"--metrics {text!r}: choose from {','.join(ALL_METRICS)} (comma-separated)")
    return tuple(m for m in ALL_METRICS if m in names)


def _stage(progress: Optional[Progress], stage: str) -> Optional[Callable[[int, int], None]]:
    return None if progress is None else (lambda d, n: progress(stage, d, n))


def metric_protocol(metrics: Sequence[str], kid_subsets: int, kid_subset_size: int) -> Dict[str, Any]:
    """The definitions in force, as a report records them (metrics.py has the prose)."""
    out: Dict[str, Any] = {}
    if "fid" in metrics:
        out["fid"] = {"statistics": "pool3 mean and covariance (N-1), float64",
                      "sqrtm": "scipy.linalg.sqrtm of sigma1 @ sigma2", "singular_eps": FID_EPS}
    if "isc" in metrics:
        out["isc"] = {"classifier": "softmax of logits_unbiased (1008)", "splits": IS_SPLITS,
                      "order": f"np.random.RandomState({SEED}).permutation", "std": "population, over splits"}
    if "kid" in metrics:
        out["kid"] = {"kernel": "(x.y / d + 1)^3", "estimator": "unbiased MMD^2", "subsets": kid_subsets,
                      "subset_size": kid_subset_size, "subset_rng": f"np.random.RandomState({SEED})"}
    if "prc" in metrics:
        out["prc"] = {"k": PR_K, "radius": "squared distance to the k-th nearest other member of its set",
                      "precision": "fraction of samples inside some reference ball",
                      "recall": "fraction of reference features inside some sample ball",
                      "distances": "squared Euclidean, float32"}
    return out


# ----------------------------------------------------------------------------- input checks
def check_inputs(metrics: Sequence[str], ref: str, *, samples: Optional[PathLike] = None,
                 ckpt: Optional[PathLike] = None, tokenizer: Optional[PathLike] = None,
                 data: Optional[PathLike] = None) -> Optional[FileSet]:
    """Every input of an evaluation checked before the Inception weights are loaded, so a missing
    folder, an empty one, an unknown --ref or a bad .npz is named as such (offline, loading the
    weights would fail first and hide it). Samples or a checkpoint; or tokenizer + data. Returns
    the samples' FileSet (for `evaluate_samples`), else None."""
    if tokenizer is not None and data is not None:
        d, cfg = read_checkpoint_config(resolve_checkpoint(tokenizer, "--tokenizer"))
        if cfg["kind"] != "tokenizer":
            raise UserError(f"--tokenizer {d} is a {cfg['kind']} checkpoint, expected a tokenizer")
        scan_image_folder(data)
        return None
    fs = samples_folder(samples) if samples is not None else None
    if fs is not None:
        hw = fs.size
    else:
        d, cfg = read_checkpoint_config(resolve_checkpoint(ckpt, "--ckpt"))
        if cfg["kind"] != "var":
            raise UserError(f"--ckpt {d} is a {cfg['kind']} checkpoint, expected a var (transformer) checkpoint")
        r = validate_preset(cfg["preset"], f"checkpoint {d} preset").resolution
        hw = (r, r)
    if any(m in metrics for m in ("fid", "kid", "prc")):
        check_reference(ref, hw)
    return fs


# ---------------------------------------------------------------------------- samples → report
@dataclass
class EvalPlan:
    """What a combination of `fvar eval` inputs asks for."""

    mode: str                    # "feature-net", "reconstruction", "samples" or "checkpoint"
    ckpt: Optional[Path]         # the checkpoint to sample from (chosen as the newest when `newest`)
    newest: bool = False


def plan_eval(*, samples: Optional[Path] = None, ckpt: Optional[Path] = None, tokenizer: Optional[Path] = None,
              data: Optional[Path] = None, feature_net: Optional[Path] = None, real: Optional[Path] = None) -> EvalPlan:
    """Decide the evaluation from its inputs; every contradictory combination is a one-line
    UserError. With nothing to evaluate named, the newest var checkpoint under the runs folder
    is sampled (`runs.newest_checkpoint`)."""
    if feature_net is not None:
        if data is not None:
            raise UserError("--feature-net evaluates samples against --ref; --data (reconstruction) does not apply "
                            "(the report's reconstruction row uses --tokenizer on --ref)")
        if ckpt is None and samples is None and real is None and tokenizer is None:
            return EvalPlan("feature-net", newest_checkpoint("var"), newest=True)
        return EvalPlan("feature-net", ckpt)
    if data is not None:
        if tokenizer is None:
            raise UserError("--data measures a tokenizer's reconstructions: pass --tokenizer CKPT too")
        if samples is not None or ckpt is not None:
            raise UserError("--tokenizer/--data (reconstruction) cannot be combined with --samples or --ckpt")
        return EvalPlan("reconstruction", None)
    if tokenizer is not None and ckpt is None:
        raise UserError("--tokenizer measures reconstructions with --data DIR, or decodes --ckpt's samples; "
                        + ("with --samples it has nothing to do" if samples is not None else
                           "alone it does not say what to evaluate: add --data DIR (or --ckpt)"))
    if samples is not None and ckpt is not None:
        raise UserError("pass --samples or --ckpt, not both")
    if samples is not None:
        return EvalPlan("samples", None)
    if ckpt is None:
        return EvalPlan("checkpoint", newest_checkpoint("var"), newest=True)
    return EvalPlan("checkpoint", ckpt)


def evaluate_samples(samples: PathLike, ref: str, extractor: InceptionFeatures, metrics: Sequence[str] = ALL_METRICS,
                     *, files: Optional[Sequence[PathLike]] = None, fileset: Optional[FileSet] = None,
                     batch_size: int = 64,
                     kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                     generation: Optional[Dict[str, Any]] = None,
                     progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Evaluate the images of `samples` (or exactly `files`) against `ref`; returns the report.
    `fileset`: the samples as `check_inputs` already listed and sized them (not read again)."""
    metrics = tuple(metrics)
    fs = fileset if fileset is not None else samples_folder(samples, files)
    need_ref_features = "kid" in metrics or "prc" in metrics
    reference = None  # IS alone needs none
    t0 = time.perf_counter()
    if need_ref_features or "fid" in metrics:
        # the reference first (open_reference checks it before any work): its problems — a corrupt
        # image, a truncated .npz — surface before the sample pass, not after it
        reference = open_reference(ref, fs.size, extractor, need_ref_features, batch_size,
                                   progress=_stage(progress, "reference features"))
    t1 = time.perf_counter()
    sp = feature_pass(read_files(fs.files, batch_size), extractor, len(fs.files), logits="isc" in metrics,
                      progress=_stage(progress, "sample features"))
    t2 = time.perf_counter()
    values: Dict[str, Any] = {}
    if "fid" in metrics:
        mu, sigma = sp.stats.mean_cov()
        values["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if "isc" in metrics:
        m, s = inception_score(sp.logits)
        values["isc"] = {"mean": m, "std": s}
    if "kid" in metrics:
        values["kid"] = kernel_inception_distance(sp.features, reference.features, kid_subsets, kid_subset_size)
    if "prc" in metrics:
        p, r = precision_recall(sp.features, reference.features, device=extractor.device)
        values["precision"], values["recall"] = p, r
    t3 = time.perf_counter()
    proto = metric_protocol(metrics, kid_subsets, kid_subset_size)
    if "kid" in values:
        proto["kid"]["subset_size"] = values["kid"]["subset_size"]
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "created": _utc_now(), "kind": "samples",
        "metrics": values,
        "samples": {"path": str(fs.root.resolve()), "count": len(fs.files), "size": [fs.size[1], fs.size[0]],
                    "preprocessing": "none (files used as they are)"},
        "reference": reference.describe() if reference is not None else None,
        "protocol": {"extractor": extractor.protocol(), "metrics": proto,
                     "generation": generation, "seeds": None if generation is None else generation["seeds"]},
        "timings_s": {"reference": round(t1 - t0, 3), "sample_features": round(t2 - t1, 3),
                      "metrics": round(t3 - t2, 3)},
    }


# ------------------------------------------------------------------------- checkpoint → report
def class_labels(num_samples: int, per_class: int, num_classes: int) -> List[int]:
    """Labels of images 0..N−1: class c for images c·per_class … (c+1)·per_class − 1."""
    if num_samples < 1 or per_class < 1 or num_samples % per_class:
        raise UserError(f"--num-samples {num_samples} is not a positive multiple of --per-class {per_class}")
    classes = num_samples // per_class
    if classes > num_classes:
        raise UserError(f"--num-samples {num_samples} / --per-class {per_class} = {classes} classes, but the model "
                        f"has {num_classes}; lower --num-samples or raise --per-class")
    return [i // per_class for i in range(num_samples)]


def _check_generation(out: Path, doc: Dict[str, Any]) -> None:
    """Refuse to resume into a folder generated with anything else (another checkpoint, settings, seeds)."""
    f = out / GENERATION_NAME
    if not f.is_file():
        if out.is_dir() and any(p.suffix == ".png" for p in out.iterdir()):
            raise UserError(f"{out} already holds PNG files but no {GENERATION_NAME}: not an fvar eval sample "
                            f"folder; choose another --out")
        return
    try:
        old = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{f} is corrupt; remove {out} or choose another --out") from None
    keys = ("checkpoint", "tokenizer", "settings", "seeds", "labels")
    diff = [k for k in keys if old.get(k) != doc.get(k)]
    if diff:
        raise UserError(f"{out} holds samples generated with a different {', '.join(diff)}; "
                        f"choose another --out or remove it")


def default_samples_dir(ckpt: Path, num_samples: int, seed: int) -> Path:
    """<runs>/eval/<run>-<checkpoint>-n<N>-s<seed>: the same folder on a rerun, so it resumes."""
    run = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.parent.name
    return runs_dir() / "eval" / f"{run}-{ckpt.name}-n{num_samples}-s{seed}"


@dataclass
class Generation:
    """A generated sample folder: its images and what generated them."""

    out: Path
    paths: List[Path]
    record: Dict[str, Any]  # generation.json's content plus resumed_with / generated / generation_s


def generate_samples(ckpt: PathLike, *, num_samples: int, per_class: int, seed: int = 0,
                     settings_overrides: Optional[Dict[str, Any]] = None, out: Optional[PathLike] = None,
                     tokenizer: Optional[PathLike] = None, device: Optional[str] = None, sample_batch_size: int = 32,
                     show_progress: bool = True, before: Optional[Callable[[Any], None]] = None) -> Generation:
    """Generate (or resume) N samples of a var checkpoint into a folder (see the module docstring).
    `before(preset)` runs after the checkpoint is read and before anything is generated (the
    caller's input checks)."""
    ck_dir, cfg = read_checkpoint_config(resolve_checkpoint(ckpt, "--ckpt"))
    if cfg["kind"] != "var":
        raise UserError(f"{ck_dir} is a {cfg['kind']} checkpoint, expected a var (transformer) checkpoint")
    preset = validate_preset(cfg["preset"], f"checkpoint {ck_dir} preset")
    if before is not None:
        before(preset)
    labels = class_labels(num_samples, per_class, preset.model.num_classes)
    seeds = [seed + i for i in range(num_samples)]
    settings = settings_from(preset.sample, **(settings_overrides or {}))
    tok_dir = find_tokenizer(ck_dir, cfg.get("provenance", {}), tokenizer)
    out_dir = Path(out) if out is not None else default_samples_dir(ck_dir, num_samples, seed)
    generation = {
        "checkpoint": {"path": str(ck_dir.resolve()), "sha256": file_sha256(ck_dir / WEIGHTS_NAME),
                       "preset": preset.name},
        "tokenizer": {"path": str(Path(tok_dir).resolve()), "sha256": file_sha256(Path(tok_dir) / WEIGHTS_NAME)},
        "settings": settings.model_dump(mode="json"),
        "seeds": {"base": seed, "rule": "image i has seed base + i"},
        "labels": {"num_samples": num_samples, "per_class": per_class, "classes": num_samples // per_class,
                   "rule": "image i has class i // per_class"},
        "resolution": preset.resolution, "out": str(out_dir.resolve()),
    }
    _check_generation(out_dir, generation)
    ensure_dir(out_dir, "--out")
    write_json(out_dir / GENERATION_NAME, {**generation, "created": _utc_now()})
    t0 = time.perf_counter()
    done_before = sum(1 for i in range(num_samples) if (out_dir / f"{i:06d}.png").is_file())
    paths = generate_to_folder(ck_dir, out_dir, labels, seeds, settings, batch_size=sample_batch_size,
                               tokenizer=Path(tok_dir), device=device, progress=show_progress)
    record = {**generation, "resumed_with": done_before, "generated": num_samples - done_before,
              "generation_s": round(time.perf_counter() - t0, 3)}
    return Generation(out_dir, paths, record)


def evaluate_checkpoint(ckpt: PathLike, ref: str, extractor: InceptionFeatures, metrics: Sequence[str] = ALL_METRICS,
                        *, num_samples: int = 50_000, per_class: int = 50, seed: int = 0,
                        settings_overrides: Optional[Dict[str, Any]] = None, out: Optional[PathLike] = None,
                        tokenizer: Optional[PathLike] = None, device: Optional[str] = None,
                        sample_batch_size: int = 32, batch_size: int = 64,
                        kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                        show_progress: bool = True, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Generate (or resume) N samples of a var checkpoint, then `evaluate_samples` them."""

    def check(preset: Any) -> None:
        if set(metrics) - {"isc"}:  # before generating anything
            check_reference(ref, (preset.resolution, preset.resolution), extractor.weights.sha256)

    gen = generate_samples(ckpt, num_samples=num_samples, per_class=per_class, seed=seed,
                           settings_overrides=settings_overrides, out=out, tokenizer=tokenizer, device=device,
                           sample_batch_size=sample_batch_size, show_progress=show_progress, before=check)
    report = evaluate_samples(gen.out, ref, extractor, metrics, files=gen.paths, batch_size=batch_size,
                              kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, generation=gen.record,
                              progress=progress)
    report["kind"] = "checkpoint"
    return report


# -------------------------------------------------------------------- tokenizer reconstruction
def tokenizer_reconstruction(tokenizer: PathLike, data: PathLike, extractor: Optional[InceptionFeatures], *,
                             rfid_note: str = "", max_images: Optional[int] = None, batch_size: int = 16,
                             device: Optional[Any] = None, progress: Optional[Progress] = None,
                             on_batch: Optional[Callable[[Any, Any, List[int]], None]] = None) -> Dict[str, Any]:
    """PSNR / SSIM (and rFID with an extractor) of a tokenizer over an image folder.

    Images: VAR's evaluation transform at the tokenizer's resolution (data.preprocess, centre
    crop); reconstruction: `Tokenizer.img_to_recon` (all scales of the structure codebook, VAR's
    decode path). Both are quantised to uint8, as a saved image would be, before any metric.
    rFID: FID between the pool3 statistics of the originals and of the reconstructions.
    `on_batch(originals, reconstructions, labels)` sees every batch as uint8 (B, 3, R, R).
    """
    import torch

    dev = torch.device(device or "cpu")
    ck = load_checkpoint(resolve_checkpoint(tokenizer, "--tokenizer"), expect_kind="tokenizer")
    tok = build_tokenizer(ck).to(dev).eval()
    R = ck.preset.resolution
    folder = check_folder(data)
    good, bad = folder.good, folder.bad
    if max_images is not None and len(good) > max_images:
        good = good.subset(subset_indices(len(good), max_images).tolist())
    ds = ImageFolderDataset.from_config(good, R, ck.preset.data, train=False)
    psnrs: List[float] = []
    ssims: List[float] = []
    orig_stats, rec_stats = RunningStats(), RunningStats()
    skipped = [r for _, r in bad]
    t0 = time.perf_counter()
    for s in range(0, len(ds), batch_size):
        xs, ys = [], []
        for i in range(s, min(s + batch_size, len(ds))):
            try:
                x, y = ds.load(i)
            except UserError as e:
                skipped.append(str(e))
                continue
            xs.append(x)
            ys.append(int(y))
        if not xs:
            continue
        x = torch.stack(xs).to(dev)  # (B, 3, R, R) in [-1, 1]
        with torch.no_grad():
            rec = tok.img_to_recon(x)
        u8 = [((t.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu() for t in (x, rec)]
        a, b = (u.double() / 255.0 for u in u8)
        psnrs += psnr(a, b).tolist()
        ssims += ssim(a, b).tolist()
        if on_batch is not None:
            on_batch(u8[0], u8[1], ys)
        if extractor is not None:
            orig_stats.update(extract_batch(u8[0].permute(0, 2, 3, 1).numpy(), extractor).pool)
            rec_stats.update(extract_batch(u8[1].permute(0, 2, 3, 1).numpy(), extractor).pool)
        if progress is not None:
            progress("reconstructing", min(s + batch_size, len(ds)), len(ds))
    if not psnrs:
        raise UserError(f"no readable images in {data}")
    rfid = None
    if extractor is not None:
        rfid = frechet_distance(*orig_stats.mean_cov(), *rec_stats.mean_cov())
    finite = [p for p in psnrs if math.isfinite(p)]
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "created": _utc_now(), "kind": "reconstruction",
        "metrics": {"psnr": float(np.mean(finite)) if finite else None, "ssim": float(np.mean(ssims)),
                    "rfid": rfid},
        "tokenizer": {"path": str(ck.path.resolve()), "sha256": file_sha256(ck.path / WEIGHTS_NAME),
                      "preset": ck.preset.name, "resolution": R},
        "data": {"path": str(Path(data).resolve()), "count": len(psnrs), "skipped": len(skipped),
                 "skipped_examples": skipped[:5], "identical_images": len(psnrs) - len(finite)},
        "protocol": {"preprocessing": f"VAR eval transform: short side round({ck.preset.data.mid_reso} R) LANCZOS, "
                                      f"centre crop R = {R}",
                     "reconstruction": "Tokenizer.img_to_recon (structure codebook, all scales), uint8",
                     "psnr": "10 log10(1/MSE) per image on [0,1], mean over images (identical images left out)",
                     "ssim": "Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, valid, per channel, mean",
                     "rfid": (extractor.protocol() if extractor is not None else None),
                     "rfid_skipped": None if extractor is not None else (rfid_note or "no Inception weights")},
        "timings_s": {"total": round(time.perf_counter() - t0, 3)},
    }


# ---------------------------------------------------------------------------------- alias figures
def alias_folder(folder: PathLike, preset, max_images: Optional[int] = None,
                 progress: Optional[Progress] = None) -> Dict[str, Any]:
    """`fvar pyramid analyze` over every image of a folder, averaged per scale.

    Each image is fit to the preset's resolution (images.fit_square: shorter side, bicubic with
    antialias, centre crop) and analysed alone (alias.alias_report); per scale the report gives
    the arithmetic mean over images of leak (dB; images with nothing to leak at that scale are
    left out and counted), margin (dB) and passband kept.
    """
    files = list(scan_image_folder(folder).files)
    if max_images is not None:
        files = files[:max_images]
    R = preset.resolution
    per_scale: List[Dict[str, List[float]]] = []
    for n, f in enumerate(files):
        rows = alias_report(fit_square(load_image(f), R), preset.pyramid, preset.patch_nums, R)
        if not per_scale:
            per_scale = [{"leak_db_area": [], "leak_db_focus": [], "margin_db": [], "passband_area": [],
                          "passband_focus": [], "size": r.size, "rho": r.rho} for r in rows]
        for acc, r in zip(per_scale, rows):
            d = r.to_dict()
            for k in ("leak_db_area", "leak_db_focus", "margin_db", "passband_area", "passband_focus"):
                if d[k] is not None:
                    acc[k].append(d[k])
        if progress is not None:
            progress("alias analysis", n + 1, len(files))

    def mean(v: List[float]) -> Optional[float]:
        return float(np.mean(v)) if v else None

    scales = []
    for k, acc in enumerate(per_scale):
        scales.append({"scale": k + 1, "size": acc["size"], "rho": acc["rho"],
                       **{key: mean(acc[key]) for key in ("leak_db_area", "leak_db_focus", "margin_db",
                                                          "passband_area", "passband_focus")},
                       "images_with_leak": len(acc["leak_db_area"])})
    return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "created": _utc_now(), "kind": "alias",
            "folder": str(Path(folder).resolve()), "count": len(files), "preset": preset.name,
            "resolution": R, "pyramid": preset.pyramid.model_dump(mode="json"), "scales": scales,
            "protocol": {"fit": "images.fit_square (bicubic, antialias, centre crop)",
                         "mean": "arithmetic mean over images per scale; leak in dB, images without energy "
                                 "above the scale's Nyquist left out (images_with_leak counts the rest)"}}


def write_report(report: Dict[str, Any], path: PathLike) -> Path:
    """The report as indented JSON, written atomically."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(report, indent=2, allow_nan=False, default=_json_default) + "\n").encode())
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
