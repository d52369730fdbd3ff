"""Reference statistics for FID / KID / precision-recall: named, built once, or read from ADM .npz.

A named reference lives in the user cache directory, `$FVAR_CACHE` or else
`$XDG_CACHE_HOME/fvar` or `~/.cache/fvar` (`cache_dir()`), as

    refs/<name>/ref.json      {"format": "fvar-refstats", "version": 1, name, resolution, count,
                               features_count, source {kind, path, fingerprint, classes, skipped},
                               preprocessing {crop, description}, extractor {... weights sha256}}
    refs/<name>/mu.npy        (2048,) float64        pool3 mean of all `count` images
    refs/<name>/sigma.npy     (2048, 2048) float64   pool3 covariance (N − 1)
    refs/<name>/features.npy  (M, 2048) float32      pool3 of M ≤ max_features images (a fixed-seed
                                                     subset: np.random.default_rng(0)), for KID and P/R

and is written into a temporary sibling then renamed, so a crash never leaves half a reference.
ADM's default reference set for P/R has 10,000 images, hence `max_features` = 10,000.

A reference *spec* (what `fvar eval --ref` takes) is, in this order: an existing .npz file (ADM
layout, see imagesets), an existing folder of images (features computed on the fly with the ADM
crop at the samples' resolution), or the name of a built reference. OpenAI's reference batches
(`VIRTUAL_imagenet256_labeled.npz`) hold the images (`arr_0`, 10k) and the TF Inception
mean/covariance (`mu`, `sigma`; also `mu_s`/`sigma_s` for sFID, unused) but not the pool features,
so, as ADM's evaluator does, FID uses the stored `mu`/`sigma` and KID / P/R the features of
`arr_0`, computed once per (file, extractor weights) and cached under `npz-features/`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np

from fvar_core import envvars
from fvar_core.atomic import umask
from fvar_core.errors import UserError
from fvar_core.jsondocs import read_json_doc
from fvar_core.eval.features import InceptionFeatures, extract_batch
from fvar_core.eval.imagesets import CROP_DESCRIPTION, crop_transform, folder_images, open_npz, read_files
from fvar_core.eval.metrics import RunningStats
from fvar_core.data.folders import check_folder

ENV_CACHE = envvars.CACHE
FORMAT = "fvar-refstats"
VERSION = 1
MAX_FEATURES = 10_000
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

PathLike = Union[str, Path]
Progress = Callable[[int, int], None]


def cache_dir() -> Path:
    """`$FVAR_CACHE`, else `$XDG_CACHE_HOME/fvar`, else ~/.cache/fvar."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fvar"


def refs_dir() -> Path:
    return cache_dir() / "refs"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_dir_atomically(target: Path, files: dict) -> None:
    """{name: ndarray | bytes | json-able dict} → directory `target`, replaced in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    aside = None
    try:
        os.chmod(tmp, 0o777 & ~umask())
        for name, obj in files.items():
            if isinstance(obj, np.ndarray):
                _save_npy(tmp / name, obj)
            elif isinstance(obj, bytes):
                (tmp / name).write_bytes(obj)
            else:
                (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, aside)
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not target.exists():
            os.replace(aside, target)
            aside = None
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            raise UserError(f"no space left on device writing {target}; nothing was overwritten") from None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# -------------------------------------------------------------------------------- feature pass
@dataclass
class Pass:
    """What one pass of the extractor over an image set gives: streamed mean/cov of all images,
    the pool features of the kept indices, and the logits when asked for."""

    stats: RunningStats
    features: np.ndarray  # (M, 2048) float32
    logits: Optional[np.ndarray]  # (N, 1008) float32 or None


def feature_pass(batches: Iterator[np.ndarray], extractor: InceptionFeatures, total: int,
                 keep: Optional[np.ndarray] = None, logits: bool = False,
                 progress: Optional[Progress] = None) -> Pass:
    """Run the extractor over uint8 (B, H, W, 3) batches. `keep`: sorted indices of the images whose
    pool features to return (None: all)."""
    stats, kept, lgs, seen = RunningStats(), [], [], 0
    for batch in batches:
        fs = extract_batch(batch, extractor)
        stats.update(fs.pool)
        idx = np.arange(seen, seen + len(batch))
        sel = slice(None) if keep is None else np.isin(idx, keep)
        kept.append(fs.pool[sel])
        if logits:
            lgs.append(fs.logits)
        seen += len(batch)
        if progress is not None:
            progress(seen, total)
    if seen == 0:
        raise UserError("no readable images to extract features from")
    return Pass(stats, np.concatenate(kept).astype(np.float32),
                np.concatenate(lgs) if logits else None)


def subset_indices(n: int, max_features: int) -> np.ndarray:
    """Sorted indices of the images whose features a reference keeps: all, or a fixed-seed subset."""
    if n <= max_features:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, max_features, replace=False))


# ---------------------------------------------------------------------------- named references
def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UserError(f"reference name '{name}': use letters, digits, '.', '_' and '-' (at most 100)")
    return name


def build_reference(data: PathLike, name: str, resolution: int, extractor: InceptionFeatures, *,
                    crop: str = "adm", max_features: int = MAX_FEATURES, batch_size: int = 64,
                    overwrite: bool = False, progress: Optional[Progress] = None,
                    check_progress: Optional[Progress] = None) -> dict:
    """Compute a named reference from an image folder (see the module docstring); returns its ref.json."""
    check_name(name)
    target = refs_dir() / name
    if (target / "ref.json").exists() and not overwrite:
        raise UserError(f"reference '{name}' exists ({target}); pass --overwrite to rebuild it")
    transform = crop_transform(crop, resolution)
    folder = check_folder(data, progress=check_progress)
    good, bad = folder.good, folder.bad
    skipped: List[Tuple[Path, str]] = list(bad)
    keep = subset_indices(len(good), max_features)
    p = feature_pass(read_files(list(good.files), batch_size, transform, skipped=skipped), extractor,
                     len(good), keep=keep, progress=progress)
    mu, sigma = p.stats.mean_cov()
    meta = {
        "format": FORMAT, "version": VERSION, "name": name, "created": _utc_now(),
        "resolution": resolution, "count": p.stats.n, "features_count": int(len(p.features)),
        "source": {"kind": "folder", "path": str(Path(data).resolve()), "fingerprint": folder.scanned.fingerprint(),
                   "classes": len(folder.scanned.classes), "files": folder.total, "skipped": len(skipped),
                   "skipped_examples": [r for _, r in skipped[:5]]},
        "preprocessing": {"crop": crop, "description": CROP_DESCRIPTION[crop], "resolution": resolution},
        "features_subset": "all" if len(keep) == len(good) else f"{len(keep)} of {len(good)}, "
                                                                   f"np.random.default_rng(0).choice, sorted",
        "extractor": extractor.protocol(),
    }
    _write_dir_atomically(target, {"mu.npy": mu, "sigma.npy": sigma,
                                   "features.npy": p.features, "ref.json": meta})
    return meta


def read_meta(name: str) -> dict:
    """The ref.json of a named reference."""
    path = refs_dir() / name / "ref.json"
    if not path.is_file():
        known = list_references()
        hint = f" (built: {', '.join(m['name'] for m in known)})" if known else ""
        raise UserError(f"no reference named '{name}' in {refs_dir()}{hint}; build one with "
                        f"`fvar eval ref build --data DIR --name {name}`")
    return read_json_doc(path, FORMAT, VERSION, what="an fvar reference description", name="reference",
                         subject=f"reference '{name}'", fix="rebuild the reference")


def list_references() -> List[dict]:
    """ref.json of every named reference under refs_dir(), by name (unreadable ones skipped)."""
    out = []
    root = refs_dir()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            f = d / "ref.json"
            if d.is_dir() and not d.name.startswith(".") and f.is_file():
                try:
                    meta = json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(meta, dict) and meta.get("format") == FORMAT:
                    out.append(meta)
    return out


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is missing or corrupt ({e}); rebuild the reference") from None


# ------------------------------------------------------------------------- references to use
@dataclass
class Reference:
    """What an evaluation compares against. `features` is None until asked for."""

    spec: str
    kind: str  # "named" | "npz" | "folder"
    identity: str  # one line naming it for the report
    path: str
    resolution: Tuple[int, int]  # (H, W) of the reference images
    count: int
    mu: np.ndarray
    sigma: np.ndarray
    features: Optional[np.ndarray]
    fid_statistics: str  # where mu/sigma come from
    meta: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "identity": self.identity, "path": self.path,
                "resolution": list(self.resolution), "count": self.count,
                "features_count": None if self.features is None else int(len(self.features)),
                "fid_statistics": self.fid_statistics, **({"built": self.meta} if self.meta else {})}


def _res_error(what: str, ref_hw: Tuple[int, int], hw: Tuple[int, int], rebuild: str) -> UserError:
    return UserError(f"{what} is {ref_hw[1]}×{ref_hw[0]} but the samples are {hw[1]}×{hw[0]}: "
                     f"FID across resolutions is meaningless; {rebuild}")


def check_reference(spec: str, hw: Tuple[int, int], weights_sha256: Optional[str] = None) -> str:
    """Cheap check before any work (before generating 50,000 samples): the reference exists, is
    well formed, has the samples' resolution and (a named one) was built with the Inception
    weights of this evaluation (`weights_sha256`, when given). Returns its kind."""
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix != ".npz":
            raise UserError(f"--ref {spec}: a file must be an ADM .npz batch")
        npz = open_npz(p)
        if npz.size != hw:
            raise _res_error(f"reference batch {p.name}", npz.size, hw, "use the batch of the samples' resolution")
        return "npz"
    if p.is_dir():
        folder_images(p, "reference folder")  # an empty folder fails here
        if hw[0] != hw[1]:
            raise UserError(f"samples are {hw[1]}×{hw[0]}, and a folder reference is compared as square "
                            f"{hw[0]}×{hw[0]} ADM crops: FID across shapes is meaningless; use square samples")
        return "folder"
    if Path(spec).suffix == ".npz" or os.sep in spec:
        raise UserError(f"--ref {spec}: no such file or folder")
    meta = read_meta(check_name(spec))
    r = int(meta["resolution"])
    if (r, r) != tuple(hw):
        raise _res_error(f"reference '{spec}' (built at --res {r})", (r, r), hw,
                         f"build one at {hw[0]} (`fvar eval ref build --data DIR --name NAME --res {hw[0]}`)")
    built_sha = meta.get("extractor", {}).get("weights", {}).get("sha256")
    if weights_sha256 is not None and built_sha != weights_sha256:
        raise UserError(f"reference '{spec}' was built with other Inception weights (sha256 {str(built_sha)[:12]}…) "
                        f"than this evaluation uses ({weights_sha256[:12]}…); rebuild it with `fvar eval ref build` "
                        f"or pass the same --feature-weights")
    return "named"


def _npz_features(npz, extractor: InceptionFeatures, batch_size: int, progress: Optional[Progress]) -> Pass:
    """Features of an .npz's arr_0, cached per (file path, size, mtime, extractor weights)."""
    st = npz.path.stat()
    key = hashlib.sha256(f"{npz.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|"
                         f"{extractor.weights.sha256}".encode()).hexdigest()[:32]
    d = cache_dir() / "npz-features" / key
    if (d / "features.npy").is_file() and (d / "stats.npz").is_file():
        with np.load(d / "stats.npz", allow_pickle=False) as z:
            stats = RunningStats.from_state(dict(z))
        return Pass(stats, _load_npy(d / "features.npy"), None)
    p = feature_pass(npz.batches(batch_size), extractor, npz.count, progress=progress)
    buf = io.BytesIO()
    np.savez(buf, **p.stats.state())
    try:
        _write_dir_atomically(d, {"features.npy": p.features, "stats.npz": buf.getvalue(),
                                  "source.json": {"npz": str(npz.path.resolve()),
                                                  "weights_sha256": extractor.weights.sha256}})
    except OSError as e:  # an unwritable cache costs the next run time, never this run its result
        import warnings

        warnings.warn(f"could not cache the .npz features in {d} ({e.strerror or e}); they are recomputed "
                      f"next time (set FVAR_CACHE to a writable folder)", stacklevel=2)
    return p


def open_reference(spec: str, hw: Tuple[int, int], extractor: InceptionFeatures, need_features: bool,
                   batch_size: int = 64, progress: Optional[Progress] = None) -> Reference:
    """Load (or compute) a reference for samples of size `hw` = (H, W); see the module docstring."""
    kind = check_reference(spec, hw, extractor.weights.sha256)
    if kind == "npz":
        npz = open_npz(Path(spec).expanduser())
        ident = f"ADM batch {npz.path.name} ({npz.count} images)"
        # ADM's stored mu/sigma are the official Inception's statistics: against features of other
        # weights they compare two different networks, so then they are recomputed from arr_0
        stored = npz.has_stats and extractor.weights.official
        p = _npz_features(npz, extractor, batch_size, progress) if (need_features or not stored) else None
        if stored:
            mu, sigma = npz.stats()
            src = "stored mu/sigma of the .npz (ADM's protocol)"
        else:
            mu, sigma = p.stats.mean_cov()
            src = ("computed from arr_0 (the stored mu/sigma belong to the official Inception weights, not these)"
                   if npz.has_stats else "computed from arr_0 (no mu/sigma in the .npz)")
        return Reference(spec, "npz", ident, str(npz.path.resolve()), npz.size, npz.count, mu, sigma,
                         None if p is None else p.features, src)
    if kind == "folder":
        root = Path(spec).expanduser()
        files = folder_images(root, "reference folder")
        transform = crop_transform("adm", hw[0])
        # FID statistics over every image; pool features kept for KID / precision-recall from a
        # fixed-seed subset of at most MAX_FEATURES, as `ref build` does (ADM: 10,000)
        p = feature_pass(read_files(files, batch_size, transform), extractor, len(files),
                         keep=subset_indices(len(files), MAX_FEATURES), progress=progress)
        mu, sigma = p.stats.mean_cov()
        return Reference(spec, "folder", f"folder {root} ({len(files)} images, ADM crop at {hw[0]})",
                         str(root.resolve()), (hw[0], hw[0]), p.stats.n, mu, sigma, p.features,
                         "computed from the folder (ADM crop)")
    meta = read_meta(spec)
    d = refs_dir() / spec
    mu, sigma = _load_npy(d / "mu.npy"), _load_npy(d / "sigma.npy")
    feats = _load_npy(d / "features.npy") if need_features else None
    r = int(meta["resolution"])
    return Reference(spec, "named", f"'{spec}' ({meta['count']} images of {meta['source']['path']}, "
                                    f"{meta['preprocessing']['crop']} crop at {r})",
                     str(d), (r, r), int(meta["count"]), mu, sigma, feats, "stored mu/sigma of the reference",
                     meta={k: meta[k] for k in ("created", "source", "preprocessing", "features_count")})
