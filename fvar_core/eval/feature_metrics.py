"""Evaluation in a trained classifier's feature space: works offline, on any labelled data.

For each evaluated set of images (samples of a checkpoint, and calibration rows) against a
reference folder (e.g. the test split):

    accuracy    share of images the classifier assigns to their conditioning class
    fid         Fréchet distance of the penultimate-layer features (mean, covariance N−1, float64)
    kid         unbiased polynomial-kernel MMD², subsets as `metrics.kernel_inception_distance`
    precision / recall   k = 3 manifolds (`metrics.precision_recall`, ADM's definition)

These are NOT Inception figures: numbers compare only within one feature network (its weights'
sha256 is in every report). The scale is calibrated in the same table by rows that need no
generator: real images of the training split against the reference (the floor a perfect model
reaches with that many images) and the tokenizer's reconstructions of the reference images (the
best a generator using that tokenizer can hope for).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from fvar_core.eval.classifier import LoadedClassifier, labelled_folder, load_classifier, load_images, predict
from fvar_core.errors import UserError
from fvar_core.eval.metrics import FID_EPS, KID_SUBSET_SIZE, KID_SUBSETS, PR_K, frechet_distance, kernel_inception_distance, \
    mean_cov, precision_recall
from fvar_core.data.folders import scan_image_folder
from fvar_core.devices import pick_device
from fvar_core.eval.evaluate import generate_samples, tokenizer_reconstruction
from fvar_core.sample.loading import class_names_for
from fvar_core.checkpoints import read_checkpoint_config
from fvar_core.runs import find_tokenizer, resolve_checkpoint

PathLike = Union[str, Path]
REPORT_FORMAT = "fvar-feature-eval"
CAVEAT = ("feature-space figures of fvar's own classifier, not Inception: comparable only with other figures "
          "from the same feature network (same sha256)")


@dataclass
class ImageSet:
    """uint8 images (N, 3, H, W) and, when known, their conditioning classes as names."""

    name: str
    images: torch.Tensor
    classes: Optional[List[str]]  # class name of each image, or None
    source: str


def _sidecar_labels(folder: Path) -> Optional[Dict[str, int]]:
    """file name → class id, from fvar sample's samples.json or fvar eval's generation.json."""
    s = folder / "samples.json"
    if s.is_file():
        try:
            doc = json.loads(s.read_text(encoding="utf-8"))
            return {e["file"]: int(e["class"]) for e in doc["images"]}
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{s}: unreadable samples.json (no per-image classes)") from None
    g = folder / "generation.json"
    if g.is_file():
        try:
            lab = json.loads(g.read_text(encoding="utf-8"))["labels"]
            per, n = int(lab["per_class"]), int(lab["num_samples"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{g}: unreadable generation.json (no label rule)") from None
        return {f"{i:06d}.png": i // per for i in range(n)}
    return None


def sample_set(folder: PathLike, class_names: Optional[Sequence[str]], resolution: int,
               name: str = "samples") -> ImageSet:
    """A folder written by `fvar sample` / `fvar eval --ckpt` (classes from its sidecar; class id →
    name through `class_names`, the generating run's classes.json) or an ImageFolder of samples
    (classes from the folder names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--samples {folder}: no such folder")
    ids = _sidecar_labels(folder)
    if ids is None:
        images, labels, classes, _ = labelled_folder(folder, resolution)
        return ImageSet(name, images, [classes[int(y)] for y in labels], str(folder.resolve()))
    files = sorted(f for f in ids if (folder / f).is_file())
    if not files:
        raise UserError(f"{folder}: its sidecar names no image that exists")
    names = list(class_names) if class_names is not None else None

    def cname(c: int) -> str:
        if names is None:
            return str(c)
        if not 0 <= c < len(names):
            raise UserError(f"{folder}: class {c} has no name (the run has {len(names)} classes)")
        return names[c]

    images, keep, bad = load_images([folder / f for f in files], resolution)
    if bad:
        raise UserError(f"{folder}: {len(bad)} sample image(s) unreadable, e.g. {bad[0][1]}")
    return ImageSet(name, images, [cname(ids[f]) for f in files], str(folder.resolve()))


def folder_set(folder: PathLike, resolution: int, name: str, per_class: Optional[int] = None) -> ImageSet:
    """A labelled ImageFolder as an ImageSet (classes = folder names)."""
    images, labels, classes, _ = labelled_folder(folder, resolution, per_class)
    return ImageSet(name, images, [classes[int(y)] for y in labels], str(Path(folder).resolve()))


def _row(clf: LoadedClassifier, s: ImageSet, ref_feats: np.ndarray, kid_subsets: int, kid_subset_size: int,
         device: Optional[torch.device]) -> Dict[str, Any]:
    feats, pred = predict(clf.net, s.images)
    f = feats.double().numpy()
    row: Dict[str, Any] = {"name": s.name, "source": s.source, "count": len(s.images)}
    if s.classes is not None:
        known = {c: i for i, c in enumerate(clf.classes)}
        missing = sorted({c for c in s.classes if c not in known})
        if missing:
            raise UserError(f"{s.name}: classes {missing[:3]} are not among the classifier's "
                            f"({', '.join(clf.classes[:4])}, …): was it trained on this dataset?")
        want = torch.tensor([known[c] for c in s.classes])
        row["accuracy"] = float((pred == want).float().mean())
        per = {}
        for c, i in known.items():
            m = want == i
            if m.any():
                per[c] = round(float((pred[m] == i).float().mean()), 4)
        row["accuracy_per_class"] = per
    mu, sigma = mean_cov(f)
    rmu, rsigma = mean_cov(ref_feats)
    row["fid"] = frechet_distance(mu, sigma, rmu, rsigma)
    row["kid"] = kernel_inception_distance(f, ref_feats, kid_subsets, kid_subset_size)
    p, r = precision_recall(f.astype(np.float32), ref_feats.astype(np.float32), device=device)
    row["precision"], row["recall"] = p, r
    return row


def evaluate_sets(clf: LoadedClassifier, reference: ImageSet, rows: Sequence[ImageSet], *,
                  kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE) -> Dict[str, Any]:
    """One report: a row per image set (see the module docstring), all against `reference`."""
    if len(reference.images) < 2:
        raise UserError(f"reference {reference.source}: at least 2 images needed")
    ref_feats, ref_pred = predict(clf.net, reference.images)
    ref = {"name": reference.name, "source": reference.source, "count": len(reference.images)}
    if reference.classes is not None and all(c in clf.classes for c in reference.classes):
        want = torch.tensor([clf.classes.index(c) for c in reference.classes])
        ref["classifier_accuracy"] = float((ref_pred == want).float().mean())
    dev = next(clf.net.parameters()).device
    out_rows = [_row(clf, s, ref_feats.double().numpy(), kid_subsets, kid_subset_size, dev) for s in rows]
    return {
        "format": REPORT_FORMAT, "version": 1, "caveat": CAVEAT,
        "feature_net": {"path": str(clf.path.resolve()), "weights_sha256": clf.weights_sha256,
                        "layer": f"penultimate ({clf.net.feature[0].out_features} features)",
                        "classes": clf.classes, "resolution": clf.net.resolution},
        "reference": ref, "rows": out_rows,
        "protocol": {"fid": {"statistics": "mean, covariance (N-1), float64", "singular_eps": FID_EPS},
                     "kid": {"kernel": "(x.y / d + 1)^3", "subsets": kid_subsets, "subset_size": kid_subset_size},
                     "prc": {"k": PR_K}, "accuracy": "argmax of the classifier == conditioning class",
                     "resize": f"bilinear (antialiased) to {clf.net.resolution} px inside the network"},
    }


def format_table(report: Dict[str, Any]) -> str:
    """The report as a markdown table, the caveat under it."""
    head = "| images | n | class acc. | FID | KID ×10³ | precision | recall |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in report["rows"]:
        acc = f"{100 * r['accuracy']:.1f}%" if r.get("accuracy") is not None else "–"
        fid = f"{r['fid']:.2f}".replace("-0.00", "0.00")  # a set against itself: ±1e-7 of sqrtm rounding
        lines.append(f"| {r['name']} | {r['count']} | {acc} | {fid} | {1e3 * r['kid']['mean']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    ref = report["reference"]
    acc = ref.get("classifier_accuracy")
    lines.append("")
    lines.append(f"Reference: {ref['source']} ({ref['count']} images"
                 + (f", classifier accuracy {100 * acc:.1f}%" if acc is not None else "") + "). "
                 + f"Feature net sha256 {report['feature_net']['weights_sha256'][:16]}…: {CAVEAT}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the whole evaluation
def _samples_class_names(folder: Path) -> Optional[List[str]]:
    """The generating run's class names, found through the sample folder's sidecar."""
    for side in ("samples.json", "generation.json"):  # both name the checkpoint they came from
        f = folder / side
        if f.is_file():
            try:
                path = json.loads(f.read_text(encoding="utf-8"))["checkpoint"]["path"]
            except (OSError, ValueError, KeyError, TypeError):
                return None
            return class_names_for(path) if Path(path).is_dir() else None
    return None


def reconstruction_set(tokenizer: PathLike, reference: PathLike, max_images: int,
                       device: Optional[str] = None) -> tuple:
    """(ImageSet of the tokenizer's reconstructions of up to max_images reference images, the
    reconstruction report: PSNR/SSIM over the same images)."""
    classes = list(scan_image_folder(reference).classes)
    recs: List[torch.Tensor] = []
    names: List[str] = []

    def keep(_orig: torch.Tensor, rec: torch.Tensor, labels: List[int]) -> None:
        recs.append(rec)
        names.extend(classes[y] for y in labels)

    report = tokenizer_reconstruction(tokenizer, reference, None, max_images=max_images, device=device,
                                      batch_size=64, on_batch=keep, rfid_note="feature-space evaluation")
    return ImageSet("tokenizer reconstructions", torch.cat(recs), names, report["tokenizer"]["path"]), report


def feature_evaluation(feature_net: PathLike, reference: PathLike, *, samples: Optional[PathLike] = None,
                       ckpt: Optional[PathLike] = None, per_class: int = 100, num_samples: Optional[int] = None,
                       seed: int = 0, settings_overrides: Optional[Dict[str, Any]] = None,
                       out: Optional[PathLike] = None, real: Optional[PathLike] = None,
                       tokenizer: Optional[PathLike] = None, calibration_images: int = 1000,
                       device: Optional[str] = None, sample_batch_size: int = 64, show_progress: bool = True,
                       kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE) -> Dict[str, Any]:
    """`fvar eval --feature-net CLF`: samples (a folder, or generated from `ckpt`: per_class images of
    each class, resumable) plus the calibration rows — `real` (images of another real split, e.g.
    the training split, per_class of each class) and the reconstructions of `calibration_images`
    reference images by `tokenizer` (default: the checkpoint's) — all against `reference`."""
    import time

    t0 = time.perf_counter()
    device = str(pick_device(device or "auto"))
    if samples is not None and ckpt is not None:
        raise UserError("pass --samples or --ckpt, not both")
    ref_dir = Path(reference)
    if not ref_dir.is_dir():
        raise UserError(f"--ref {ref_dir}: with --feature-net the reference is a labelled image folder "
                        f"(e.g. the test split)")
    if real is not None and not Path(real).is_dir():
        raise UserError(f"--real {real}: no such folder")
    clf = load_classifier(feature_net, device)
    R = clf.net.resolution
    ref = folder_set(ref_dir, R, "reference")
    rows: List[ImageSet] = []
    generation = None
    tok_for_recon = tokenizer
    if ckpt is not None:
        ck_dir, cfg = read_checkpoint_config(resolve_checkpoint(ckpt, "--ckpt"))
        if cfg["kind"] != "var":
            raise UserError(f"{ck_dir} is a {cfg['kind']} checkpoint, expected a var (transformer) checkpoint")
        n = num_samples or per_class * int(cfg["preset"]["model"]["num_classes"])
        gen = generate_samples(ck_dir, num_samples=n, per_class=per_class, seed=seed,
                               settings_overrides=settings_overrides, out=out, tokenizer=tokenizer, device=device,
                               sample_batch_size=sample_batch_size, show_progress=show_progress)
        generation = gen.record
        samples = gen.out
        if tok_for_recon is None:
            tok_for_recon = find_tokenizer(ck_dir, cfg.get("provenance", {}), None)
    if samples is not None:
        rows.append(sample_set(samples, _samples_class_names(Path(samples)), R))
    per = per_class
    if rows and rows[0].classes:
        per = max(1, round(len(rows[0].images) / max(1, len(set(rows[0].classes)))))
    if real is not None:
        rows.append(folder_set(real, R, f"real images ({Path(real).name} split)", per_class=per))
    recon = None
    if tok_for_recon is not None:
        rec_set, recon = reconstruction_set(tok_for_recon, ref_dir, calibration_images, device)
        rows.append(rec_set)
    if not rows:
        raise UserError("nothing to evaluate: pass --samples DIR, --ckpt RUN, --real DIR or --tokenizer CKPT")
    report = evaluate_sets(clf, ref, rows, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    if recon is not None:
        report["rows"][-1]["psnr"] = recon["metrics"]["psnr"]
        report["rows"][-1]["ssim"] = recon["metrics"]["ssim"]
        report["reconstruction"] = recon
    report["generation"] = generation
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report
