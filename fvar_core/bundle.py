"""The models that ship inside fvar, by name: `fvar sample --ckpt fmnist-32`, `--feature-net fmnist`.

They live in `fvar_core/bundled/` (package data: the wheel and the sdist carry them) as ordinary
fvar checkpoint folders, listed by `bundled/manifest.json`:

    {"format": "fvar-bundle", "version": 1, "default": "fmnist-32",
     "models": {name: {"kind": "var" | "classifier", "summary": "...", "precision": "float16",
                       "files": {path relative to bundled/: sha256}, "metrics": {...}, "recipe": "..."}}}

Every file of a model (its tokenizer's too) is checked against the manifest's sha256 before the
model is used, once per process; a damaged or missing file is one line that says to reinstall.
`fvar release pack` writes the folder; `pipelines/release.py` is the recipe.

A name resolves only where no file or folder of that name exists: your own `./fmnist-32` wins.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from fvar_core.errors import UserError
from fvar_core.hashing import file_sha256

BUNDLE_DIR = Path(__file__).parent / "bundled"
MANIFEST_NAME = "manifest.json"
FORMAT = "fvar-bundle"
VERSION = 1

_CHECKED: Dict[str, Path] = {}  # name → folder, verified by this process


def manifest(root: Optional[Path] = None) -> Dict[str, Any]:
    """The bundle's manifest (an empty one when nothing is bundled)."""
    f = (root or BUNDLE_DIR) / MANIFEST_NAME
    if not f.is_file():
        return {"format": FORMAT, "version": VERSION, "default": None, "models": {}}
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{f} is damaged ({type(e).__name__}): reinstall fvar") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("models"), dict):
        raise UserError(f"{f} is not an fvar bundle manifest: reinstall fvar")
    if data.get("version", 0) > VERSION:
        raise UserError(f"{f} is bundle version {data['version']}; this fvar reads up to {VERSION}: upgrade fvar")
    return data


def bundled_names(kind: Optional[str] = None) -> List[str]:
    """The bundled models' names (of one kind: 'var' or 'classifier'), sorted."""
    return sorted(n for n, m in manifest()["models"].items() if kind is None or m.get("kind") == kind)


def default_model() -> Optional[str]:
    """The name `fvar sample` uses when given no checkpoint and no run has one (None if none ships)."""
    return manifest().get("default")


def is_bundled_name(spec: Union[str, Path]) -> bool:
    """`spec` names a bundled model and no file or folder of that name exists."""
    s = str(spec)
    return s in manifest()["models"] and not Path(s).exists()


def bundled_path(name: str, root: Optional[Path] = None) -> Path:
    """The verified folder of the bundled model `name` (every file's sha256 against the manifest)."""
    root = root or BUNDLE_DIR
    key = f"{root}:{name}"
    if key in _CHECKED:
        return _CHECKED[key]
    models = manifest(root)["models"]
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        raise UserError(f"no bundled model {name!r} (bundled: {known})")
    entry = models[name]
    for rel, want in sorted(entry.get("files", {}).items()):
        f = root / rel
        if not f.is_file():
            raise UserError(f"bundled model {name}: {rel} is missing: reinstall fvar "
                            f"(pip install --force-reinstall fvar)")
        if file_sha256(f) != want:
            raise UserError(f"bundled model {name}: {rel} is damaged (its sha256 differs from the recorded one): "
                            f"reinstall fvar (pip install --force-reinstall fvar)")
    _CHECKED[key] = root / entry["path"]
    return _CHECKED[key]


def resolve_name(spec: Union[str, Path]) -> Path:
    """A bundled model's verified folder if `spec` names one (see `is_bundled_name`), else `spec`."""
    return bundled_path(str(spec)) if is_bundled_name(spec) else Path(spec)
