"""Class names ↔ class ids: what a person types (`--class sneaker,bag`, `classes=["ankle boot"]`).

Names come from the checkpoint's class list (`classes.json`: a run's image-folder names such as
`7-sneaker`, whose leading `<label>-` is not part of the name) or, for checkpoints trained on
ImageNet (1,000 classes, no list of their own), from the 1,000 ImageNet names shipped in
`assets/imagenet-classes.txt`. Matching ignores case, spaces and punctuation ("Ankle boot",
"ankle-boot" and "ankleboot" are one name); a name given in parts ("T-shirt/top") answers to each
part too; a unique prefix is accepted ("tshirt"). An unknown name is a one-line error listing the
closest names.
"""
from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fvar_core.errors import UserError

IMAGENET_CLASSES = 1000
_ASSET = Path(__file__).parent / "assets" / "imagenet-classes.txt"


def normalize(name: str) -> str:
    """'Ankle boot' / 'ankle-boot' / 'ANKLE_BOOT' → 'ankleboot'."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def display_name(name: str) -> str:
    """A class-list entry as people read it: an image folder's '9-ankle-boot' → 'ankle boot'; a
    plain name ('T-shirt/top') stays as it is."""
    m = re.fullmatch(r"\d+-(.+)", name)
    return m.group(1).replace("-", " ").strip() if m else name


@lru_cache(maxsize=1)
def imagenet_names() -> List[str]:
    """The 1,000 ImageNet-1k class names, in class-id order."""
    names = _ASSET.read_text(encoding="utf-8").splitlines()
    if len(names) != IMAGENET_CLASSES:  # a damaged install: say so rather than mis-map classes
        raise UserError(f"{_ASSET} holds {len(names)} names, expected {IMAGENET_CLASSES}: reinstall fvar")
    return names


def names_for(class_list: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """The display names of a model's classes: its own list, else ImageNet's for a 1,000-class
    model, else None (the model's classes have numbers only)."""
    if class_list:
        return [display_name(n) for n in class_list]
    return list(imagenet_names()) if num_classes == IMAGENET_CLASSES else None


def _keys(name: str) -> List[str]:
    """Every normalized form `name` answers to: itself and its '/'- or ','-separated parts."""
    parts = [name, *re.split(r"[/,]", name)]
    return list(dict.fromkeys(k for k in map(normalize, parts) if k))


@lru_cache(maxsize=8)
def _index(names: tuple) -> Dict[str, List[int]]:
    idx: Dict[str, List[int]] = {}
    for i, n in enumerate(names):
        for k in _keys(n):
            idx.setdefault(k, []).append(i)
    return idx


def class_id(name: str, names: Sequence[str], where: str = "--class") -> int:
    """The id of the class called `name` among `names` (display names; see the module docstring)."""
    key = normalize(name)
    if not key:
        raise UserError(f"{where} {name!r}: not a class name")
    idx = _index(tuple(names))
    hits = idx.get(key)
    if not hits:  # a unique prefix of one class's name
        hits = sorted({i for k, ids in idx.items() if k.startswith(key) for i in ids})
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise UserError(f"{where} {name!r} is ambiguous: " + ", ".join(f"{names[i]} ({i})" for i in hits[:8]))
    close = difflib.get_close_matches(key, list(idx), n=5, cutoff=0.6)
    ids = list(dict.fromkeys(i for k in close for i in idx[k]))
    hint = ("closest: " + ", ".join(f"{names[i]} ({i})" for i in ids)) if ids else \
        f"the classes are {', '.join(names[:12])}{', …' if len(names) > 12 else ''}"
    raise UserError(f"{where}: unknown class {name!r}; {hint}")
