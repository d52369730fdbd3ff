"""Image folders → VAR-preprocessed training images (reference: docs/var-compat.md §3.5, docs/design.md §7).

Layout (torchvision's ImageFolder, VAR's ImageNet layout)::

    root/<class name>/**/*.{jpg,jpeg,png,...}      label = index of the class in sorted(names)

Preprocessing is VAR's (`utils/data.py`): the shorter side is resized to round(mid_reso · R) with
PIL's LANCZOS (the longer side to int(mid · long / short), torchvision's rule), then a random
R × R crop for training or the centre crop for evaluation, an optional horizontal flip
(VAR: off), and [0, 1] → [-1, 1]. Items are float32 (3, R, R) with an int label.

Reproducible randomness: the crop offset and the flip of item i in epoch e come from a generator
seeded with (seed, e, i) — `numpy.random.default_rng([seed, epoch, i])` — never from global RNG
state. An item is therefore the same whatever the worker count, the batch it lands in, or the
process that loads it, and a resumed run sees the crops of the uninterrupted one by setting the
same seed and epoch (`set_epoch`). Data *order* is the sampler's business (seed it the same way).

Unreadable files never crash a run. `validate` opens every file header-deep (PIL open + verify)
and returns the good index plus (path, reason) for the rest; what verify cannot see (a JPEG
truncated halfway) surfaces on decode, where `__getitem__` falls back to the next readable item
and records the path in `failures`.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from PIL import Image

from fvar_core.config import DataConfig
from fvar_core.errors import UserError
from fvar_core.atomic import atomic_write_bytes
from fvar_core.data.images import UNREADABLE, bomb_guard, open_rgb, unreadable_reason

# Pillow-readable still-image formats (lower case; matching is case-insensitive: ImageNet's .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

CLASS_INDEX_FORMAT = "fvar-class-index"
CLASS_INDEX_VERSION = 1


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(name: str) -> bool:
    return name.startswith(".")


# --------------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class FolderIndex:
    """The images of a folder: files[i] has label labels[i], a class index into `classes`.

    Files are sorted by class, then by path relative to their class folder (a stable order on
    every machine). `ignored` counts files seen without an image extension; `skipped` names the
    symbolic links the scan did not follow (loops, links out of the folder; see `images_under`).
    """

    root: Path
    classes: Tuple[str, ...]
    files: Tuple[Path, ...]
    labels: Tuple[int, ...]
    ignored: int = 0
    skipped: Tuple[Tuple[Path, str], ...] = ()  # symbolic links not followed, with the reason

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, keep: Sequence[int]) -> "FolderIndex":
        """The same classes, only the items at `keep` (in that order)."""
        return FolderIndex(self.root, self.classes, tuple(self.files[i] for i in keep),
                           tuple(self.labels[i] for i in keep), self.ignored, self.skipped)

    def first_per_class(self, n: int) -> "FolderIndex":
        """The first n items of each class (in index order): a class-balanced subset."""
        seen = [0] * len(self.classes)
        keep = []
        for i, y in enumerate(self.labels):
            if seen[y] < n:
                seen[y] += 1
                keep.append(i)
        return self.subset(keep)

    def class_counts(self) -> List[int]:
        counts = [0] * len(self.classes)
        for y in self.labels:
            counts[y] += 1
        return counts

    def fingerprint(self) -> str:
        """sha256 of the classes and the (label, path relative to root) list: which files, in which
        order, under which labels — not their contents (that would mean reading every file)."""
        h = hashlib.sha256()
        h.update(json.dumps(list(self.classes)).encode())
        for f, y in zip(self.files, self.labels):
            h.update(f"{y}\t{f.relative_to(self.root).as_posix()}\n".encode())
        return h.hexdigest()


FOLLOW_LINKS_ENV = "FVAR_FOLLOW_LINKS"  # =1: follow symbolic links that leave the data folder


def _key(path: Path) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _link_problem(p: Path, real_root: Path, indexed: Sequence[Path] = ()) -> Optional[str]:
    """Why the symbolic link p is not followed, or None: dangling, out of the data folder (unless
    $FVAR_FOLLOW_LINKS=1), or a file link to a file under an `indexed` folder (counted there)."""
    try:
        target = p.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop of links
        return "a broken symbolic link"
    if os.environ.get(FOLLOW_LINKS_ENV, "") in ("", "0") and not _inside(target, real_root):
        return (f"a symbolic link to {target}, outside the data folder {real_root} (not followed; "
                f"set {FOLLOW_LINKS_ENV}=1 to follow such links)")
    if p.is_file() and any(_inside(target, d) for d in indexed):
        return f"a symbolic link to {target}, which is indexed itself"
    return None


def images_under(folder: Path, root: Optional[Path] = None, visited: Optional[Set[Tuple[int, int]]] = None,
                 indexed: Sequence[Path] = ()) -> Tuple[List[Path], int, List[Tuple[Path, str]]]:
    """Image files below `folder` (recursive, hidden entries skipped), sorted by relative path;
    the number of other files; and (path, reason) for each symbolic link not followed.

    Symbolic links are followed once: a folder already visited (device and inode in `visited`,
    shared across the class folders of one scan) is a loop and skipped; other links are checked
    by `_link_problem` against `root` (default `folder`) and the `indexed` folders."""
    folder = Path(folder)
    real_root = Path(root if root is not None else folder).resolve()
    visited = set() if visited is None else visited
    visited.add(_key(folder))
    found, other, skipped = [], 0, []
    link_problem = lambda p: _link_problem(p, real_root, indexed)  # noqa: E731

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            p = Path(dirpath) / d
            if _hidden(d):
                continue
            problem = link_problem(p) if p.is_symlink() else None
            if problem is None:
                key = _key(p)
                if key in visited:
                    problem = f"a folder already indexed ({p.resolve()}): a symbolic link loop or a second link to it"
                else:
                    visited.add(key)
            if problem is None:
                keep.append(d)
            else:
                skipped.append((p, problem))
        dirnames[:] = keep
        for name in filenames:
            if _hidden(name):
                continue
            p = Path(dirpath) / name
            if not _is_image_name(name):
                other += 1
                continue
            problem = link_problem(p) if p.is_symlink() else None
            if problem is None:
                found.append(p)
            else:
                skipped.append((p, problem))
    found.sort(key=lambda p: p.relative_to(folder).as_posix())
    return found, other, skipped


def scan_image_folder(root: Union[str, Path]) -> FolderIndex:
    """Index an ImageFolder: classes = sorted names of the sub-folders of `root` (any number,
    hidden ones skipped), each class's images found recursively.

    A class folder without images keeps its class index (so labels agree between train and val
    folders that share the class list) as long as some class has images. A *flat* folder —
    images directly in `root` and no sub-folders — is accepted as one class named after the
    folder. With class folders present, files directly in `root` are ignored. Nothing to use
    (no such folder, empty, or no image files) → UserError.
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"no such data folder: {root}")
    if not root.is_dir():
        raise UserError(f"{root} is a file, expected a folder of class sub-folders with images")
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden(e.name))
    files: List[Path] = []
    labels: List[int] = []
    ignored = 0
    skipped: List[Tuple[Path, str]] = []
    if subdirs:
        classes = tuple(subdirs)
        # the root and every class folder count as visited from the start: a link back to any of
        # them is a loop, or would store one class's images under another's label
        visited = {_key(root)}
        real: Dict[str, Path] = {}  # the class folders followed: name → resolved path
        for name in classes:
            d = root / name
            problem = _link_problem(d, root.resolve()) if d.is_symlink() else None
            if problem is None and _key(d) in visited:
                problem = f"a second link to a folder already indexed ({d.resolve()})"
            if problem is None:
                visited.add(_key(d))
                real[name] = d.resolve()
            else:
                skipped.append((d, problem))
        for y, name in enumerate(classes):
            if name not in real:
                continue  # the class keeps its index, with no images
            found, other, links = images_under(root / name, root, visited, list(real.values()))
            files += found
            labels += [y] * len(found)
            ignored += other
            skipped += links
    else:
        entries = sorted(e.name for e in os.scandir(root) if e.is_file() and not _hidden(e.name))
        if not entries:
            raise UserError(f"data folder {root} is empty (expected class sub-folders with images)")
        found = [root / n for n in entries if _is_image_name(n)]
        classes = (root.resolve().name or "images",)
        files, labels, ignored = found, [0] * len(found), len(entries) - len(found)
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS[:3])}, ...) under {root} "
                        f"(looked in {len(classes)} class folder(s))")
    return FolderIndex(root, classes, tuple(files), tuple(labels), ignored, tuple(skipped))


def write_class_index(path: Union[str, Path], classes: Sequence[str]) -> None:
    """`{"format": "fvar-class-index", "version": 1, "classes": [...]}` (atomically); class id i is
    `classes[i]`, which is how sampling and evaluation map ids back to names."""
    doc = {"format": CLASS_INDEX_FORMAT, "version": CLASS_INDEX_VERSION, "classes": list(classes)}
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())


def read_class_index(path: Union[str, Path]) -> List[str]:
    """The class names of a file written by `write_class_index`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no such class index: {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable class index ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != CLASS_INDEX_FORMAT:
        raise UserError(f"{path}: not an fvar class index (format should be '{CLASS_INDEX_FORMAT}')")
    if doc.get("version", 0) > CLASS_INDEX_VERSION:
        raise UserError(f"{path}: class index version {doc.get('version')} is newer than this fvar reads "
                        f"({CLASS_INDEX_VERSION}); upgrade fvar")
    classes = doc.get("classes")
    if not isinstance(classes, list):
        raise UserError(f"{path}: class index without a 'classes' list")
    return [str(c) for c in classes]


# ---------------------------------------------------------------------------- validation
def _check(path: Path, decode: bool) -> Optional[str]:
    # No global state touched here (validate runs it in threads): the caller holds one
    # images.bomb_guard around all the calls.
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            else:
                im.verify()
    except UNREADABLE as e:
        return unreadable_reason(path, e)
    return None


def check_image_file(path: Union[str, Path], decode: bool = False) -> Optional[str]:
    """None if Pillow can read the file, else a one-line reason. Header-deep by default (open +
    verify: reads headers and, for PNG, the chunk CRCs); `decode=True` also decodes the pixels,
    which catches what verify cannot (a JPEG cut off halfway) at the cost of a full decode."""
    with bomb_guard():
        return _check(Path(path), decode)


def validate(index: FolderIndex, decode: bool = False, workers: int = 8,
             progress: Optional[Callable[[int, int], None]] = None
             ) -> Tuple[FolderIndex, List[Tuple[Path, str]]]:
    """Check every file of `index` (see `check_image_file`; threads, since it is I/O bound).

    Returns (the index without the unreadable files, [(path, reason)] for those and for the
    symbolic links the scan did not follow), order kept.
    `progress(done, total)` is called as files are checked.
    """
    n = len(index)
    reasons: List[Optional[str]] = []
    with bomb_guard(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, n, 4096):  # chunks: a million pending futures would cost gigabytes
            reasons += pool.map(lambda p: _check(p, decode), index.files[start:start + 4096])
            if progress is not None:
                progress(len(reasons), n)
    good = [i for i, r in enumerate(reasons) if r is None]
    bad = list(index.skipped) + [(index.files[i], r) for i, r in enumerate(reasons) if r is not None]
    if not good:
        raise UserError(f"none of the {n} image files under {index.root} is readable "
                        f"(first: {bad[len(index.skipped)][1]})")
    return index.subset(good), bad


@dataclass
class CheckedFolder:
    """An image folder after the scan and the check: the readable files, and the ones left out."""

    root: Path
    scanned: FolderIndex              # every file the scan found (after `per_class`)
    good: FolderIndex                 # the readable ones, to use, in index order
    bad: List[Tuple[Path, str]]       # (path, reason) of every file left out

    @property
    def total(self) -> int:
        return len(self.scanned)

    def summary(self) -> str:
        return f"{self.root}: {len(self.good)} images in {len(self.good.classes)} classes"

    def report(self, listed_in: Optional[Union[str, Path]] = None) -> Optional[str]:
        """`validation_report` of the files left out, or None when every file was readable."""
        return validation_report(self.bad, self.total, listed_in=listed_in) if self.bad else None

    def dataset(self, resolution: int, data_cfg: DataConfig, *, train: bool, seed: int = 0) -> "ImageFolderDataset":
        return ImageFolderDataset.from_config(self.good, resolution, data_cfg, train=train, seed=seed)


def check_folder(root: Union[str, Path], *, per_class: Optional[int] = None, decode: bool = False,
                 progress: Optional[Callable[[int, int], None]] = None) -> CheckedFolder:
    """scan → (the first `per_class` images of each class) → validate: what every command that reads
    an image folder does first. Only the images that will be used are opened."""
    index = scan_image_folder(root)
    if per_class is not None:
        index = index.first_per_class(per_class)
    good, bad = validate(index, decode=decode, progress=progress)
    return CheckedFolder(Path(root), index, good, bad)


def validation_report(bad: Sequence[Tuple[Path, str]], total: int, limit: int = 5,
                      listed_in: Optional[Union[str, Path]] = None) -> str:
    """A few lines for people: how many files were skipped, and why, for the first `limit`; the
    file holding the whole list (`write_skipped`), when there is one."""
    if not bad:
        return f"all {total} image files readable"
    lines = [f"skipping {len(bad)} of {total} image files (unreadable, or links not followed):"]
    lines += [f"  {reason}" if str(path) in reason else f"  {path}: {reason}" for path, reason in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  … and {len(bad) - limit} more" + (f": every one in {listed_in}" if listed_in else ""))
    elif listed_in:
        lines.append(f"  (listed in {listed_in})")
    return "\n".join(lines)


def write_skipped(path: Union[str, Path], bad: Sequence[Tuple[Path, str]]) -> Optional[Path]:
    """Every skipped file as `path<TAB>reason` lines (atomically), or nothing (and an older list
    removed) when none was skipped. Returns the path written, or None."""
    path = Path(path)
    if not bad:
        path.unlink(missing_ok=True)
        return None
    text = "".join(f"{p}\t{' '.join(str(r).split())}\n" for p, r in bad)
    atomic_write_bytes(path, text.encode())
    return path


# ------------------------------------------------------------------------------- dataset
def resized_size(w: int, h: int, short: int) -> Tuple[int, int]:
    """(w, h) with the shorter side = `short`, the longer int(short · long / short_old)
    (torchvision's `Resize(int)` rule, which VAR uses)."""
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def preprocess(im: Image.Image, resolution: int, mid_reso: float, train: bool, hflip: bool,
               rng: Optional[np.random.Generator]) -> torch.Tensor:
    """A PIL RGB image → VAR's training/eval tensor (3, R, R) float32 in [-1, 1]."""
    R = resolution
    mid = round(mid_reso * R)
    w, h = im.size
    nw, nh = resized_size(w, h, mid)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS)
    if train:  # torchvision RandomCrop: offsets uniform in [0, size − R]
        top = int(rng.integers(0, nh - R + 1))
        left = int(rng.integers(0, nw - R + 1))
    else:      # torchvision CenterCrop
        top, left = int(round((nh - R) / 2.0)), int(round((nw - R) / 2.0))
    im = im.crop((left, top, left + R, top + R))
    if hflip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return x.mul_(2.0).sub_(1.0)  # (3, R, R) in [-1, 1], VAR's `x * 2 - 1`


class ImageFolderDataset(torch.utils.data.Dataset):
    """(image (3, R, R) float32 in [-1, 1], label) for every file of a `FolderIndex`.

    train=True: RandomCrop (+ random flip if hflip); train=False: CenterCrop, and a flip only if
    hflip (then still random per item, reproducibly). Item i of epoch e is a pure function of
    (file, seed, e, i) — see the module docstring.

    Decode failures: `__getitem__(i)` falls back to i+1, i+2, ... (wrapping) until an item
    decodes, using item i's random draw, and records the failing path and reason in `failures`.
    Limitation: with DataLoader worker processes each worker records into its own copy, so the
    main process's `failures` stays empty — run `validate` first (cheap) and, where an exact
    account matters (as `fvar tokenize` does), call `load(i)`, which raises instead.
    """

    def __init__(self, index: FolderIndex, resolution: int, mid_reso: float = 1.125, hflip: bool = False,
                 train: bool = True, seed: int = 0, epoch: int = 0):
        if mid_reso < 1.0:
            raise UserError(f"mid_reso {mid_reso} < 1: the resized image would be smaller than the crop")
        self.index = index
        self.resolution = int(resolution)
        self.mid_reso = float(mid_reso)
        self.hflip = bool(hflip)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.failures: Dict[Path, str] = {}

    @classmethod
    def from_config(cls, index: FolderIndex, resolution: int, data_cfg: DataConfig, train: bool = True,
                    seed: int = 0, epoch: int = 0) -> "ImageFolderDataset":
        """The preset's preprocessing (`data.mid_reso`, `data.hflip`). Evaluation and tokenizing
        (train=False) never flip: their crops are a function of the file."""
        return cls(index, resolution, mid_reso=data_cfg.mid_reso, hflip=data_cfg.hflip and train,
                   train=train, seed=seed, epoch=epoch)

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    def _decode(self, path: Path) -> Image.Image:
        # open_rgb holds the policy on bad files (bomb, truncated, not an image → UserError).
        return open_rgb(path)

    def load(self, i: int, rng_item: Optional[int] = None) -> Tuple[torch.Tensor, int]:
        """Item i without fallback: UserError (one line, naming the file) if it cannot be read."""
        im = self._decode(self.index.files[i])
        rng = self._rng(i if rng_item is None else rng_item) if (self.train or self.hflip) else None
        return preprocess(im, self.resolution, self.mid_reso, self.train, self.hflip, rng), self.index.labels[i]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} of {n}")
        i %= n
        for step in range(n):
            j = (i + step) % n
            try:
                return self.load(j, rng_item=i)
            except UserError as e:
                self.failures[self.index.files[j]] = str(e)
        raise UserError(f"none of the {n} image files under {self.index.root} could be decoded")
