"""Does an input fit the model or preset it is meant for (class ids, tokenizers)? One rule each.

Every check raises a one-line `UserError` that names the input, what differs and how to fix it.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Union

import numpy as np

from fvar_core.classnames import class_id
from fvar_core.config import Preset
from fvar_core.errors import UserError

NULL_CLASS_NAMES = ("uncond", "null", "none")


def check_labels(labels: Union[np.ndarray, Sequence[int]], num_classes: int, where: str, *,
                 owner: str = "the model", allow_null: bool = False, hint: str = "") -> None:
    """Class ids must lie in 0 … num_classes−1, or be num_classes (the null class, unconditional)
    where `allow_null` (what the sampler accepts); training data never carries the null class."""
    arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    top = num_classes if allow_null else num_classes - 1
    bad = arr[(arr < 0) | (arr > top)]
    if bad.size:
        null = f", or {num_classes} = unconditional" if allow_null else ""
        raise UserError(f"{where}: class {int(bad[0])} out of range: {owner} has {num_classes} classes "
                        f"(0-{num_classes - 1}{null})" + (f"; {hint}" if hint else ""))


def parse_classes(spec: Union[str, int, Sequence[Union[str, int]]], num_classes: int,
                  names: Optional[Sequence[str]] = None, where: str = "--class") -> List[int]:
    """Classes as people give them → class ids. A string: '207', '1,207,388', '0-9', 'uncond'
    (= num_classes), and — with `names`, the model's class names — names ('sneaker,ankle boot';
    `classnames.class_id`'s matching), mixed. A sequence (the Python API): each item an id (the
    id num_classes is the unconditional class, as the sampler takes it) or one name."""
    parts = ([p.strip() for p in spec.split(",")] if isinstance(spec, str)
             else [spec] if isinstance(spec, int) else list(spec))
    out: List[int] = []
    numbered: List[int] = []  # ids given as numbers: num_classes itself is not one ('uncond' is)
    for part in parts:
        if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
            out.append(int(part))
            if int(part) != num_classes:
                numbered.append(int(part))
            continue
        if not isinstance(part, str):
            raise UserError(f"{where}: a class is an id or a name, not {type(part).__name__} {part!r}")
        if part.lower() in NULL_CLASS_NAMES:
            out.append(num_classes)
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part) or re.fullmatch(r"(\d+)", part)
        if not m:
            if names is None:
                raise UserError(f"{where} {part!r}: expected ids like 207, 1,207,388 or 0-9 (or 'uncond'); "
                                f"this model's classes have no names")
            out.append(class_id(part, names, where))
            continue
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.lastindex == 2 else lo
        if hi < lo:
            raise UserError(f"{where} {part}: empty range")
        out.extend(range(lo, hi + 1))
        numbered.extend((lo, hi))
    if not out:
        raise UserError(f"{where}: no class given")
    check_labels(numbered, num_classes, where, hint="'uncond' for unconditional")
    return out


# What a transformer's tokens mean to the tokenizer that decodes them: its codebook size, latent width
# and scales. A transformer imported from the official release records nothing else about its tokenizer.
TOKEN_INTERFACE = ("vocab_size", "z_channels")


def check_tokenizer_fits(preset: Preset, tok_preset: Preset, where: str, hint: Optional[str] = None, *,
                         interface_only: bool = False) -> None:
    """The tokenizer must be the one `preset` describes: resolution, scales and every tokenizer
    field when tokens are made (training, tokenizing); only the token interface (scales,
    TOKEN_INTERFACE) when tokens are decoded (sampling), since that is all a transformer's preset
    is sure to know. A one-line UserError names the first field that differs (then `hint`, or how
    to pick the right preset)."""
    pairs = [("patch_nums", list(preset.patch_nums), list(tok_preset.patch_nums))]
    a, b = preset.tokenizer.model_dump(), tok_preset.tokenizer.model_dump()
    if not interface_only:
        pairs.insert(0, ("resolution", preset.resolution, tok_preset.resolution))
    pairs += [(f"tokenizer.{k}", a[k], b.get(k)) for k in (TOKEN_INTERFACE if interface_only else a)]
    for name, mine, theirs in pairs:
        if mine != theirs:
            raise UserError(f"{where} does not fit preset {preset.name}: {name} is {theirs} there, {mine} in the "
                            f"preset ({hint or f'choose the preset the tokenizer was made with, or --set {name}=...'})")
