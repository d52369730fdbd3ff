"""Fashion-MNIST (Xiao et al. 2017; MIT licence) as an fvar ImageFolder.

70,000 real 28×28 grey-scale photographs of garments in 10 classes, 6,000 train + 1,000 test
per class, shipped as four gzipped IDX files. `export` writes

    OUT/train/<k-name>/<index>.png     60,000 RGB PNGs (grey replicated), padded or resized
    OUT/test/<k-name>/<index>.png      10,000
    OUT/classes.json                   the class list (fvar-class-index), class k = label k
    OUT/fashion-mnist.json             what was exported: source, content sha256s, size, mode

Class folders are named `<label>-<name>` so that the sorted order ImageFolder uses is the
dataset's own label order (class 0 = T-shirt/top, …, 9 = ankle boot).

Where the IDX files come from, in this order (`find_source`): a folder the caller names; the
copy Debian's `dataset-fashion-mnist` installs (/usr/share/datasets/fashion-mnist); fvar's
cache, filled by a download from the dataset's official location (`download`), each file
checked before it is kept — against the published md5 of the .gz, or the sha256 of its
decompressed IDX content (`CONTENT_SHA256`; a re-compressed copy, such as Debian's, has another
.gz md5 but the same content).

IDX format: big-endian magic 0x0000 08 NN (08 = unsigned byte, NN = number of dimensions), NN
big-endian uint32 sizes, then the data. Every header field and the payload length are checked;
a truncated or corrupt file is one UserError line.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from fvar_core import envvars
from fvar_core.atomic import atomic_write_bytes, ensure_dir
from fvar_core.errors import UserError
from fvar_core.data.folders import write_class_index

PathLike = Union[str, Path]

NAME = "fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000)}
SIDE = 28
# The dataset's official location (its README) and the md5 of each .gz published there.
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
URL_ENV = "FVAR_FASHION_MNIST_URL"  # another base URL (a mirror, or file:// for a local copy)
GZ_MD5 = {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
          "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
          "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
          "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310"}
# sha256 of the decompressed IDX files (measured on Debian's dataset-fashion-mnist 0.0~git20200523).
CONTENT_SHA256 = {"train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                  "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                  "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                  "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MANIFEST = "fashion-mnist.json"
MANIFEST_FORMAT = "fvar-dataset-export"
IDX_UBYTE = 0x08


def class_folder(label: int) -> str:
    """'0-t-shirt-top', '1-trouser', …: sorted like the labels, safe on every file system."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in CLASSES[label].lower()).strip("-")
    return f"{label}-{'-'.join(filter(None, slug.split('-')))}"


# ------------------------------------------------------------------------------------- IDX
def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise UserError(f"{path}: truncated or corrupt gzip file ({e or type(e).__name__})") from None


def parse_idx(raw: bytes, where: str, ndim: int, count: Optional[int] = None,
              shape: Tuple[int, ...] = ()) -> np.ndarray:
    """IDX bytes → uint8 array (count, *shape); every header field and the length are checked."""
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{where}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype, nd = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != IDX_UBYTE or nd != ndim:
        raise UserError(f"{where}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
                        f"(magic {raw[:4].hex()}, expected 000008{ndim:02x})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if count is not None and dims[0] != count:
        raise UserError(f"{where}: {dims[0]} items, expected {count}")
    if tuple(dims[1:]) != tuple(shape):
        raise UserError(f"{where}: items of shape {tuple(dims[1:])}, expected {tuple(shape)}")
    want = int(np.prod(dims))
    body = raw[4 + 4 * ndim:]
    if len(body) != want:
        raise UserError(f"{where}: {len(body)} data bytes for {want} expected (truncated or padded file)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_split(source: PathLike, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """The images (N, 28, 28) uint8 and labels (N,) uint8 of one split from the .gz files in source."""
    if split not in SPLITS:
        raise UserError(f"unknown Fashion-MNIST split {split!r}: choose from {', '.join(SPLITS)}")
    img_name, lab_name, n = SPLITS[split]
    src = Path(source)
    images = parse_idx(_read_gz(src / f"{img_name}.gz"), str(src / f"{img_name}.gz"), 3, n, (SIDE, SIDE))
    labels = parse_idx(_read_gz(src / f"{lab_name}.gz"), str(src / f"{lab_name}.gz"), 1, n)
    if labels.max(initial=0) >= len(CLASSES):
        raise UserError(f"{src / lab_name}.gz: label {int(labels.max())} out of range 0–{len(CLASSES) - 1}")
    return images, labels


# --------------------------------------------------------------------------------- sources
def _has_files(folder: Path) -> bool:
    return all((folder / f"{name}.gz").is_file() for name in GZ_MD5)


def cache_dir() -> Path:
    """fvar's download cache for this dataset: $FVAR_CACHE/datasets/fashion-mnist (~/.cache/fvar)."""
    return Path(os.environ.get(envvars.CACHE, Path.home() / ".cache" / "fvar")).expanduser() / "datasets" / NAME


def verify_gz(path: Path, name: str) -> None:
    """UserError unless path is the official .gz (md5) or holds the official IDX content (sha256)."""
    data = path.read_bytes()
    if hashlib.md5(data).hexdigest() == GZ_MD5[name]:
        return
    raw = _read_gz(path)
    if hashlib.sha256(raw).hexdigest() != CONTENT_SHA256[name]:
        raise UserError(f"{name}.gz: checksum mismatch (neither the published md5 of the .gz nor the sha256 of "
                        f"its content): refusing the file")


def download(dest: Optional[PathLike] = None, base_url: Optional[str] = None, timeout: float = 30.0) -> Path:
    """Fetch the four .gz files into dest (default: `cache_dir()`), each checked (`verify_gz`) in a
    temporary file before it is renamed into place; returns dest."""
    base = (base_url or os.environ.get(URL_ENV) or OFFICIAL_URL).rstrip("/") + "/"
    dest = ensure_dir(dest or cache_dir(), "Fashion-MNIST cache")
    for name in GZ_MD5:
        target = dest / f"{name}.gz"
        if target.is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(base + f"{name}.gz", timeout=timeout) as r:
                shutil.copyfileobj(r, out)
            verify_gz(Path(tmp), name)
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"cannot download Fashion-MNIST from {base} ({reason}). {ways_out()}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def ways_out() -> str:
    return (f"Either install a local copy (as root: apt-get install dataset-fashion-mnist, which puts the files "
            f"in {DEBIAN_DIR}) or pass --source DIR, a folder with the four *-ubyte.gz files")


def find_source(source: Optional[PathLike] = None, allow_download: bool = True) -> Tuple[Path, str]:
    """(folder holding the four .gz files, how it was found): see the module docstring."""
    if source is not None:
        src = Path(source).expanduser()
        if not src.is_dir():
            raise UserError(f"--source {src}: no such folder")
        missing = [f"{n}.gz" for n in GZ_MD5 if not (src / f"{n}.gz").is_file()]
        if missing:
            raise UserError(f"--source {src}: missing {', '.join(missing)}")
        return src, "given folder"
    for folder, how in ((DEBIAN_DIR, "Debian package dataset-fashion-mnist"), (cache_dir(), "fvar cache")):
        if _has_files(folder):
            return folder, how
    if not allow_download:
        raise UserError(f"no local copy of Fashion-MNIST found (looked in {DEBIAN_DIR} and {cache_dir()}). "
                        f"{ways_out()}, or allow the download")
    return download(), "download"


# ---------------------------------------------------------------------------------- export
Mode = Literal["pad", "resize"]


def to_rgb(img28: np.ndarray, size: int, mode: Mode) -> Image.Image:
    """One (28, 28) uint8 image → an RGB PIL image of size × size: zero-padded around the centre
    (the garments lie on black), or resized with LANCZOS."""
    if mode == "pad":
        if size < SIDE:
            raise UserError(f"--size {size}: padding needs at least {SIDE} px (use --mode resize)")
        canvas = np.zeros((size, size), np.uint8)
        o = (size - SIDE) // 2
        canvas[o:o + SIDE, o:o + SIDE] = img28
        grey = Image.fromarray(canvas)
    else:
        grey = Image.fromarray(img28).resize((size, size), Image.LANCZOS)
    return grey.convert("RGB")


@dataclass
class ExportResult:
    out: Path
    source: Path
    how: str
    counts: Dict[str, List[int]]  # split → images per class written (or found complete)


def _png_bytes(im: Image.Image) -> bytes:
    # not images.save_png: that one fsyncs every file; here the whole class folder is the atomic unit
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_class(folder: Path, items: Sequence[Tuple[int, np.ndarray]], size: int, mode: Mode) -> None:
    """All images of one class into a hidden temporary folder, then one rename: a killed export
    never leaves a partly written class folder (hidden folders are invisible to data scans)."""
    tmp = folder.parent / f".{folder.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def one(item: Tuple[int, np.ndarray]) -> None:
        i, im = item
        (tmp / f"{i:05d}.png").write_bytes(_png_bytes(to_rgb(im, size, mode)))

    with ThreadPoolExecutor(max_workers=4) as pool:  # PNG encode releases the GIL
        list(pool.map(one, items))
    os.replace(tmp, folder)


def _check_manifest(out: Path, doc: dict) -> None:
    path = out / MANIFEST
    if not path.is_file():
        if any(p.name in SPLITS and p.is_dir() for p in out.iterdir()):
            raise UserError(f"{out} already holds train/test folders not written by this export; choose another --out")
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable export manifest; remove {out} or choose another --out") from None
    keys = ("size", "mode", "per_class")
    if any(old.get(k) != doc[k] for k in keys):
        was = ", ".join(f"{k} {old.get(k)}" for k in keys)
        raise UserError(f"{out} holds an export with {was}; choose another --out for these settings")


def export(out: PathLike, *, source: Optional[PathLike] = None, size: int = 32, mode: Mode = "pad",
           splits: Sequence[str] = ("train", "test"), per_class: Optional[int] = None, allow_download: bool = True,
           say: Callable[[str], None] = lambda s: None) -> ExportResult:
    """Write the ImageFolder described in the module docstring; a rerun keeps finished class
    folders and completes the rest. `per_class` keeps the first N images of each class per split."""
    if size < 8 or size > 1024:
        raise UserError(f"--size {size}: choose 8–1024 px")
    if mode not in ("pad", "resize"):
        raise UserError(f"--mode {mode!r}: choose pad or resize")
    if mode == "pad" and size < SIDE:
        raise UserError(f"--size {size}: padding needs at least {SIDE} px (use --mode resize)")
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"unknown Fashion-MNIST split {s!r}: choose from {', '.join(SPLITS)}")
    out = ensure_dir(out, "--out")
    src, how = find_source(source, allow_download)
    say(f"Fashion-MNIST from {src} ({how})")
    doc = {"format": MANIFEST_FORMAT, "version": 1, "dataset": NAME, "licence": "MIT", "size": size, "mode": mode,
           "per_class": per_class, "classes": list(CLASSES), "folders": [class_folder(k) for k in range(len(CLASSES))],
           "content_sha256": CONTENT_SHA256}
    _check_manifest(out, doc)
    atomic_write_bytes(out / MANIFEST, (json.dumps(doc, indent=2) + "\n").encode())
    write_class_index(out / "classes.json", [class_folder(k) for k in range(len(CLASSES))])
    counts: Dict[str, List[int]] = {}
    for split in splits:
        images, labels = load_split(src, split)
        counts[split] = []
        for k in range(len(CLASSES)):
            idx = np.flatnonzero(labels == k)
            if per_class is not None:
                idx = idx[:per_class]
            folder = out / split / class_folder(k)
            if not folder.is_dir():
                _write_class(folder, [(int(i), images[i]) for i in idx], size, mode)
            counts[split].append(len(idx))
        say(f"{split}: {sum(counts[split])} images in {len(CLASSES)} classes → {out / split}")
    return ExportResult(out, src, how, counts)
