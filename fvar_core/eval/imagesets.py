"""Image sets as streams of uint8 batches for the feature extractor (evaluation, docs/design.md §9).

Three kinds of set:

- a *samples* folder: generated images, used as they are (no crop, no resize); they must all have
  one size, the generator's resolution;
- a *data* folder (ImageFolder or flat): real images, centre-cropped to R × R with
  `adm` — ADM's `center_crop_arr`, the preprocessing of OpenAI's reference batches that VAR is
      evaluated against: halve with PIL BOX while the shorter side ≥ 2R, then PIL BICUBIC so the
      shorter side is R (other side round(side · R / short)), then the centre R × R crop
      (offsets floor((size − R) / 2));
  `var` — VAR's evaluation transform (`data.folders.preprocess`, train=False): shorter side to
      round(1.125 R) with LANCZOS, centre crop;
- an ADM `.npz` batch: `arr_0` uint8 (N, H, W, 3) streamed from the zip member without loading it
  whole (a 10k × 256² batch is 2 GB), optional `mu` (2048,) / `sigma` (2048, 2048) FID statistics.

Batches are numpy uint8 (B, H, W, 3), the layout of image files and of `arr_0`.
"""
from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from fvar_core.errors import UserError
from fvar_core.data.images import UNREADABLE, bomb_guard, open_rgb, unreadable_reason
from fvar_core.data.folders import images_under, preprocess

PathLike = Union[str, Path]
Transform = Callable[[Image.Image], np.ndarray]

CROPS = ("adm", "var")


# -------------------------------------------------------------------------------- centre crops
def adm_center_crop(im: Image.Image, size: int) -> np.ndarray:
    """PIL RGB → (size, size, 3) uint8, ADM's reference-batch crop (module docstring)."""
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    new = tuple(round(s * scale) for s in im.size)
    if new != im.size:
        im = im.resize(new, resample=Image.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def var_center_crop(im: Image.Image, size: int, mid_reso: float = 1.125) -> np.ndarray:
    """PIL RGB → (size, size, 3) uint8, VAR's evaluation transform (data.preprocess, train=False)."""
    x = preprocess(im, size, mid_reso, train=False, hflip=False, rng=None)  # (3, R, R) in [-1, 1]
    # exact inverse of preprocess's u/255·2−1 on uint8 u (float32 error ≪ 0.5)
    return ((x.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def crop_transform(crop: str, size: int) -> Transform:
    if crop == "adm":
        return lambda im: adm_center_crop(im, size)
    if crop == "var":
        return lambda im: var_center_crop(im, size)
    raise UserError(f"unknown crop '{crop}' (choose {' or '.join(CROPS)})")


CROP_DESCRIPTION = {
    "adm": "ADM center_crop_arr: PIL BOX halving while short side >= 2R, PIL BICUBIC to short side R, centre crop",
    "var": "VAR eval: short side to round(1.125 R) with PIL LANCZOS, centre crop",
}


# ------------------------------------------------------------------------------------ folders
@dataclass
class FileSet:
    """Image files to read, and (for samples) their common size (H, W)."""

    root: Path
    files: List[Path]
    size: Optional[Tuple[int, int]] = None


def _image_size(path: Path) -> Tuple[int, int]:
    """(H, W) from the header, without decoding; UserError for a file Pillow cannot read."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except UNREADABLE as e:
        raise UserError(unreadable_reason(path, e)) from None


def folder_images(root: PathLike, what: str) -> List[Path]:
    """Every image file below `root` (recursive, any layout: flat, class folders, or both — unlike
    a training ImageFolder, files beside class folders count too), sorted; none → UserError."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what} {root}: " + ("no such folder" if not root.exists() else "not a folder"))
    files = images_under(root)[0]
    if not files:
        raise UserError(f"{what} {root} holds no image files (.png, .jpg, ...): it is empty")
    return files


def samples_folder(path: PathLike, files: Optional[Sequence[PathLike]] = None) -> FileSet:
    """The images of a samples folder (every image below it, `folder_images`) or exactly `files`;
    checks that there are some and that they share one size."""
    root = Path(path)
    if files is None:
        files = folder_images(root, "samples folder")
    files = [Path(f) for f in files]
    if not files:
        raise UserError(f"samples folder {root} holds no image files (.png, .jpg, ...)")
    sizes: Dict[Tuple[int, int], Path] = {}
    with bomb_guard():
        for f in files:
            s = _image_size(f)
            sizes.setdefault(s, f)
            if len(sizes) > 1:
                (s0, f0), (s1, f1) = list(sizes.items())[:2]
                raise UserError(f"samples in {root} have mixed sizes: {f0.name} is {s0[1]}×{s0[0]}, "
                                f"{f1.name} is {s1[1]}×{s1[0]}; evaluation needs one size (the generator's)")
    return FileSet(root, files, next(iter(sizes)))


def read_files(files: Sequence[Path], batch_size: int, transform: Optional[Transform] = None,
               workers: int = 8, skipped: Optional[List[Tuple[Path, str]]] = None) -> Iterator[np.ndarray]:
    """Decode `files` (threads: decoding releases the GIL) → uint8 (B, H, W, 3) batches in order.

    With `skipped` given, a file that fails to decode is recorded there and left out; without it,
    the failure is a UserError naming the file.
    """
    def load(f: Path) -> Optional[np.ndarray]:
        try:
            im = open_rgb(f)
        except UserError as e:
            if skipped is None:
                raise
            skipped.append((f, str(e)))
            return None
        return transform(im) if transform is not None else np.asarray(im, dtype=np.uint8)

    with bomb_guard(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for s in range(0, len(files), batch_size):
            arrs = [a for a in pool.map(load, files[s:s + batch_size]) if a is not None]
            if arrs:
                yield np.stack(arrs)


# --------------------------------------------------------------------------------- ADM .npz
NPZ_IMAGES = "arr_0"


@dataclass
class NpzBatch:
    """An ADM-layout .npz: images `arr_0` uint8 (N, H, W, 3); `mu`/`sigma` when it carries them."""

    path: Path
    count: int
    size: Tuple[int, int]  # (H, W)
    keys: List[str] = field(default_factory=list)

    @property
    def has_stats(self) -> bool:
        return "mu" in self.keys and "sigma" in self.keys

    def stats(self) -> Tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) float64 as stored."""
        with np.load(self.path, allow_pickle=False) as z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{self.path}: mu {mu.shape} / sigma {sigma.shape} are not a mean (D,) and a "
                            f"covariance (D, D)")
        return mu, sigma

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """arr_0 in (B, H, W, 3) uint8 batches, read from the zip member as a stream."""
        with zipfile.ZipFile(self.path) as z, z.open(NPZ_IMAGES + ".npy") as f:
            shape, _, dtype = _npy_header(f, self.path)
            per_image = int(np.prod(shape[1:])) * dtype.itemsize
            for s in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - s)
                buf = f.read(n * per_image)
                if len(buf) != n * per_image:
                    raise UserError(f"{self.path}: arr_0 is truncated (image {s + len(buf) // per_image} of {shape[0]})")
                yield np.frombuffer(buf, dtype=np.uint8).reshape(n, *shape[1:])


def _npy_header(f, path: Path):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise UserError(f"{path}: arr_0 uses .npy format {version}, which fvar does not stream (1.0 or 2.0)")
    except ValueError as e:
        raise UserError(f"{path}: arr_0 is not a readable .npy array ({e})") from None
    if fortran:
        raise UserError(f"{path}: arr_0 is stored in Fortran order; save it C-contiguous")
    return shape, fortran, dtype


def open_npz(path: PathLike) -> NpzBatch:
    """Check an ADM-layout .npz (arr_0 uint8 (N, H, W, 3), optional mu+sigma) without reading images."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such .npz file: {p}")
    expect = "ADM's layout: arr_0 uint8 images (N, H, W, 3), optionally mu (2048,) and sigma (2048, 2048)"
    try:
        with zipfile.ZipFile(p) as z:
            keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if NPZ_IMAGES not in keys:
                raise UserError(f"{p} has no arr_0 (arrays: {', '.join(keys) or 'none'}); expected {expect}")
            with z.open(NPZ_IMAGES + ".npy") as f:
                shape, _, dtype = _npy_header(f, p)
    except zipfile.BadZipFile:
        raise UserError(f"{p} is not an .npz file (not a zip archive); expected {expect}") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] < 1:
        raise UserError(f"{p}: arr_0 is {dtype} {tuple(shape)}, expected {expect}")
    if ("mu" in keys) != ("sigma" in keys):
        raise UserError(f"{p} has {'mu' if 'mu' in keys else 'sigma'} without "
                        f"{'sigma' if 'mu' in keys else 'mu'}; expected {expect}")
    return NpzBatch(p, int(shape[0]), (int(shape[1]), int(shape[2])), keys)
