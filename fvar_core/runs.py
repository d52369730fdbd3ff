"""Where runs live and how a checkpoint argument is resolved.

The runs directory is `$FVAR_RUNS` when set, else `./runs`. A training command without `--out`
writes to `<runs>/<preset>-<mode>` (so rerunning it resumes); `fvar sample` / `fvar eval` without
`--ckpt` take the newest complete checkpoint of a kind found under it.

Anything that takes a checkpoint (`--ckpt`, `--tokenizer`, `--init-from`) accepts either the
checkpoint directory itself or a run directory, meaning that run's newest checkpoint.

A transformer checkpoint decodes with the tokenizer it was trained on. `find_tokenizer` looks, in
order, at a `tokenizer/` directory inside the checkpoint, then at the path its provenance records
(relative to the checkpoint; training runs keep one copy in `<run>/tokenizer`), and checks the
recorded weights hash when there is one.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from . import envvars
from .errors import FvarWarning, UserError

ENV_RUNS = envvars.RUNS
DEFAULT_RUNS = "runs"
TOKENIZER_DIR = "tokenizer"

PathLike = Union[str, Path]


def runs_dir() -> Path:
    """`$FVAR_RUNS`, else ./runs (relative to the working directory)."""
    return Path(os.environ.get(ENV_RUNS) or DEFAULT_RUNS)


def default_run_dir(preset_name: str, mode: str) -> Path:
    """<runs>/<preset>-<mode>, the run directory of a training command given no --out."""
    safe = Path(preset_name).stem if preset_name.endswith((".yaml", ".yml")) else preset_name
    return runs_dir() / f"{safe}-{mode}"


def _kind(path: Path) -> Optional[str]:
    import json

    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def newest_usable(run: Path, what: str = "checkpoint") -> Optional[Path]:
    """The newest checkpoint of a run that is complete and verifies; each newer one passed over
    (incomplete or corrupt) is named in a warning. None if the run has none."""
    from .training import usable_checkpoint

    chosen, skipped = usable_checkpoint(run)
    for d, reason in skipped:
        warnings.warn(f"{what}: skipping {d}: {reason}" + (f"; using {chosen[1].name}" if chosen else ""),
                      FvarWarning, stacklevel=3)
    return chosen[1] if chosen else None


def resolve_checkpoint(path: PathLike, what: str = "checkpoint") -> Path:
    """A checkpoint directory from a checkpoint or a run directory (→ its newest usable checkpoint)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        ck = newest_usable(p, what)
        if ck is None:
            raise UserError(f"{what}: run directory {p} has no complete checkpoint yet")
        return ck
    return p


def newest_checkpoint(kind: str = "var", root: Optional[PathLike] = None) -> Path:
    """The most recently written complete checkpoint of `kind` under the runs directory."""
    from .training import complete_checkpoints

    root = Path(root) if root is not None else runs_dir()
    found = []
    if root.is_dir():
        for run in root.iterdir():
            if run.is_dir() and complete_checkpoints(run):
                ck = newest_usable(run)
                if ck is not None and _kind(ck) == kind:
                    found.append(((ck / "model.safetensors").stat().st_mtime, str(ck), ck))
    if not found:
        how = {"var": "train one with `fvar train --tokens SHARDS` (or --data DIR --tokenizer CKPT; or "
                      "`fvar distill`), or pass --ckpt",
               "tokenizer": "train one with `fvar train-tokenizer`, or pass --tokenizer"}.get(kind, "pass one")
        raise UserError(f"no {kind} checkpoint under {root} (set ${ENV_RUNS} to look elsewhere): {how}")
    return max(found)[2]


def tokenizer_reference(tokenizer_ckpt: Path, var_ckpt: Path) -> dict[str, Any]:
    """Provenance entry linking a transformer checkpoint to its tokenizer: a path relative to the
    transformer checkpoint directory and the tokenizer weights' sha256."""
    from .checkpoints import WEIGHTS_NAME, sha256_file

    rel = os.path.relpath(Path(tokenizer_ckpt).resolve(), Path(var_ckpt).resolve())
    return {"path": rel, "sha256": sha256_file(Path(tokenizer_ckpt) / WEIGHTS_NAME)}


def find_tokenizer(var_ckpt: PathLike, provenance: Mapping[str, Any], override: Optional[PathLike] = None) -> Path:
    """The tokenizer checkpoint that decodes `var_ckpt`'s tokens (see the module docstring)."""
    from .checkpoints import WEIGHTS_NAME, sha256_file

    if override is not None:
        return resolve_checkpoint(override, "--tokenizer")
    d = Path(var_ckpt)
    if (d / TOKENIZER_DIR / "config.json").is_file():
        return d / TOKENIZER_DIR
    ref = provenance.get("tokenizer")
    if isinstance(ref, Mapping) and ref.get("path"):
        cand = Path(ref["path"])
        cand = cand if cand.is_absolute() else (d / cand)
        if (cand / "config.json").is_file():
            want = ref.get("sha256")
            if want and sha256_file(cand / WEIGHTS_NAME) != want:
                raise UserError(f"the tokenizer recorded for {d} ({cand.resolve()}) has changed since training "
                                f"(weights hash differs): pass the right one with --tokenizer")
            return cand
    raise UserError(f"{d} has no tokenizer to decode with: pass --tokenizer CKPT (a tokenizer checkpoint or run; "
                    f"for official VAR weights `fvar convert import vae_ch160v4096z32.pth --out DIR`)")
