"""Run directories: where they live, what they hold, how a checkpoint argument resolves to one.

The runs directory is `$FVAR_RUNS` when set, else `./runs`. A training command without `--out`
writes to `<runs>/<preset>-<mode>` (so rerunning it resumes); `fvar sample` / `fvar eval` without
`--ckpt` take the newest complete checkpoint of a kind found under it.

A run directory's layout is below (`CHECKPOINTS` …); `check_run_dir` refuses a folder that is
another preset's run or no run at all, `usable_checkpoint` picks the checkpoint a run resumes
from (the newest that verifies), and `RunLog` writes log.txt.

Anything that takes a checkpoint (`--ckpt`, `--tokenizer`, `--init-from`) accepts either the
checkpoint directory itself or a run directory, meaning that run's newest checkpoint.

A transformer checkpoint decodes with the tokenizer it was trained on. `find_tokenizer` looks, in
order, at a `tokenizer/` directory inside the checkpoint, then at the path its provenance records
(relative to the checkpoint; training runs keep one copy in `<run>/tokenizer`), and checks the
recorded weights hash when there is one.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from fvar_core import envvars
from fvar_core.atomic import atomic_write_bytes, check_writable, is_write_temporary, write_error
from fvar_core.bundle import resolve_name
from fvar_core.checkpoints import WEIGHTS_NAME, read_checkpoint_config, verify_checkpoint
from fvar_core.hashing import file_sha256
from fvar_core.config import Preset
from fvar_core.errors import FvarWarning, UserError
from fvar_core.presets import validate
from fvar_core.runlock import LOCK_NAME

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
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def newest_usable(run: Path, what: str = "checkpoint") -> Optional[Path]:
    """The newest checkpoint of a run that is complete and verifies; each newer one passed over
    (incomplete or corrupt) is named in a warning. None if the run has none."""
    chosen, skipped = usable_checkpoint(run)
    for d, reason in skipped:
        warnings.warn(f"{what}: skipping {d}: {reason}" + (f"; using {chosen[1].name}" if chosen else ""),
                      FvarWarning, stacklevel=3)
    return chosen[1] if chosen else None


def resolve_checkpoint(path: PathLike, what: str = "checkpoint") -> Path:
    """A checkpoint directory from a checkpoint, a run directory (→ its newest usable checkpoint) or
    the name of a model bundled with fvar (`bundle.resolve_name`: verified, unless a path of that name exists)."""
    p = resolve_name(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        ck = newest_usable(p, what)
        if ck is None:
            raise UserError(f"{what}: run directory {p} has no complete checkpoint yet")
        return ck
    return p


def newest_checkpoint(kind: str = "var", root: Optional[PathLike] = None) -> Path:
    """The most recently written complete checkpoint of `kind` under the runs directory."""
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
    rel = os.path.relpath(Path(tokenizer_ckpt).resolve(), Path(var_ckpt).resolve())
    return {"path": rel, "sha256": file_sha256(Path(tokenizer_ckpt) / WEIGHTS_NAME)}


def find_tokenizer(var_ckpt: PathLike, provenance: Mapping[str, Any], override: Optional[PathLike] = None) -> Path:
    """The tokenizer checkpoint that decodes `var_ckpt`'s tokens (see the module docstring)."""
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
            if want and file_sha256(cand / WEIGHTS_NAME) != want:
                raise UserError(f"the tokenizer recorded for {d} ({cand.resolve()}) has changed since training "
                                f"(weights hash differs): pass the right one with --tokenizer")
            return cand
    raise UserError(f"{d} has no tokenizer to decode with: pass --tokenizer CKPT (a tokenizer checkpoint or run; "
                    f"for official VAR weights `fvar convert import vae_ch160v4096z32.pth --out DIR`)")


# ------------------------------------------------------------------------------- run directory
# <run>/config.yaml (the resolved preset), metrics.jsonl, log.txt, samples/, classes.json,
# skipped-files.txt, tokenizer/ (the tokenizer a transformer run trains on), teacher/,
# checkpoints/step-XXXXXXX/ (config.json + model.safetensors + training_state.pt, written
# atomically by `checkpoints.save_checkpoint`), checkpoints/latest and checkpoints/best (names).
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
CONFIG_YAML = "config.yaml"
METRICS = "metrics.jsonl"
LOG = "log.txt"
CLASS_INDEX = "classes.json"  # in a run / shard folder: the class names, index order
SKIPPED_FILES = "skipped-files.txt"  # in a run / shard folder: every file left out, with its reason
CHECKPOINT_FILES = ("config.json", "model.safetensors", "training_state.pt")  # of a complete training checkpoint
# What else a run directory may hold (a folder with anything more is not one).
RUN_FILES = (LOG, METRICS, CHECKPOINTS, "samples", CLASS_INDEX, TOKENIZER_DIR, ".tokenizer.tmp", "teacher",
             "discriminator.safetensors", LOCK_NAME, SKIPPED_FILES)

# Fields that may change between a run and its resume: how long it runs, how it reports, and how
# the same step is executed (recompute, compilation, replicated or sharded state: checkpoints are
# full either way, so a DDP run resumes under FSDP and back).
# Anything else (architecture, lr, data processing, seed, ...) makes the run directory another run's.
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "keep_last", "sample_every", "num_workers",
                     "description", "log_with", "activation_checkpointing", "compile", "strategy")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """(step, dir) of the complete checkpoints of a run, oldest first. `save_checkpoint` renames a
    directory into place only when every file is written, so a `step-*` directory with weights,
    config and training state is complete; temporaries of an interrupted save are not listed."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for d in root.iterdir():
            name = d.name
            if d.is_dir() and name.startswith("step-") and name[5:].isdigit() and all(
                    (d / f).is_file() for f in CHECKPOINT_FILES):
                out.append((int(name[5:]), d))
    return sorted(out)


def usable_checkpoint(run_dir: Union[str, Path]) -> Tuple[Optional[Tuple[int, Path]], List[Tuple[Path, str]]]:
    """The newest checkpoint of a run that is complete and verifies (sizes and sha256 recorded at
    save time, `checkpoints.verify_checkpoint`), as (step, dir) or None; and (dir, reason) for each
    newer `step-*` directory passed over — incomplete (a file missing) or corrupt. Nothing is
    changed on disk."""
    root = Path(run_dir) / CHECKPOINTS
    dirs = sorted(((int(d.name[5:]), d) for d in root.iterdir()
                   if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit()),
                  reverse=True) if root.is_dir() else []
    skipped: List[Tuple[Path, str]] = []
    for step, d in dirs:
        missing = [f for f in CHECKPOINT_FILES if not (d / f).is_file()]
        reason = f"incomplete ({', '.join(missing)} missing)" if missing else verify_checkpoint(d)
        if reason is None:
            return (step, d), skipped
        skipped.append((d, reason))
    return None, skipped


def set_aside(d: Path) -> Path:
    """Rename a broken checkpoint to <name>.bad[-N] (never deleted; no longer a step-* checkpoint)."""
    for n in range(1000):
        aside = d.with_name(f"{d.name}.bad" + (f"-{n}" if n else ""))
        if not aside.exists():
            d.rename(aside)
            return aside
    raise UserError(f"cannot set {d} aside: too many {d.name}.bad-N folders")


def data_identity(source: str, path: Union[str, Path], fingerprint: str) -> Dict[str, str]:
    """What a run trained on: 'images' (folder, `FolderIndex.fingerprint`) or 'tokens' (shards,
    `TokenShards.fingerprint`), the resolved path and the fingerprint."""
    return {"source": source, "path": str(Path(path).resolve()), "fingerprint": fingerprint}


def check_data_identity(ckpt: Optional[Path], now: Optional[Mapping[str, Any]], allow: bool) -> Optional[str]:
    """Refuse to resume `ckpt` on other data than it was trained on (unless `allow`: then the
    note to log). Checkpoints written before data identities were recorded are not checked."""
    if ckpt is None or not now:
        return None
    was = read_checkpoint_config(ckpt)[1].get("provenance", {}).get("data_identity")
    if not isinstance(was, dict):
        return None
    diff = [k for k in ("source", "path", "fingerprint") if was.get(k) != now.get(k)]
    if not diff:
        return None
    what = (f"{was.get('source')} {was.get('path')} (fingerprint {str(was.get('fingerprint'))[:12]}) → "
            f"{now.get('source')} {now.get('path')} (fingerprint {str(now.get('fingerprint'))[:12]})")
    if not allow:
        raise UserError(f"{ckpt.parent.parent} was trained on other data ({', '.join(diff)} differ: {what}); "
                        f"pass the same --data/--tokens to resume, --allow-data-change to continue on the new "
                        f"data, or another --out")
    return f"data changed at {ckpt.name} ({what}): continuing on the new data (--allow-data-change)"


def _dump_preset(preset: Preset) -> Dict[str, Any]:
    return preset.model_dump(mode="json")


def _differences(a: Any, b: Any, prefix: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [prefix.rstrip(".")]


def check_same_run(run_dir: Path, preset: Preset) -> Optional[Dict[str, Any]]:
    """The stored preset of run_dir (None for a new run); a UserError if it is another run's
    (differences outside RESUMABLE_CHANGES)."""
    path = run_dir / CONFIG_YAML
    stored = None
    if path.is_file():
        try:
            stored = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is corrupt ({type(e).__name__}); not resuming into {run_dir}") from None
    else:
        ck = complete_checkpoints(run_dir)
        if ck:
            stored = json.loads((ck[-1][1] / "config.json").read_text(encoding="utf-8")).get("preset")
    if stored is None:
        return None
    try:  # today's defaults for fields added since the run was written (a field new in fvar is no change)
        filled = validate(stored, f"{run_dir} preset").model_dump(mode="json")
    except UserError:
        filled = stored
    diff = [d for d in _differences(filled, _dump_preset(preset)) if d.split(".")[-1] not in RESUMABLE_CHANGES]
    if diff:
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise UserError(f"{run_dir} holds a run of another preset ({stored.get('name', '?')}; differs in {shown}): "
                        f"choose another --out, or the same preset to resume")
    return stored


@dataclass(frozen=True)
class CheckedRunDir:
    """A run directory `check_run_dir` accepted for a preset; stored: the preset of the run it
    resumes (None for a new run)."""

    path: Path
    stored: Optional[Dict[str, Any]] = None


def check_run_dir(run_dir: Union[str, Path], preset: Preset) -> CheckedRunDir:
    """Refuse a run directory that is a file, unwritable, another preset's run, or not a run
    directory at all (a non-empty folder without config.yaml). Read-only: safe on every rank."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} exists and is not a directory")
    check_writable(run_dir, "run directory", folder=True)
    if not run_dir.is_dir():
        return CheckedRunDir(run_dir)
    stored = check_same_run(run_dir, preset)
    # a run killed before its config.yaml was written left at most our own files and write temporaries
    if stored is None and any(p.name not in RUN_FILES and not is_write_temporary(p.name) for p in run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not an fvar run directory (no {CONFIG_YAML}); choose another --out")
    return CheckedRunDir(run_dir, stored)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics lines written after the checkpoint a run resumes from (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= last_step:
                keep.append(line)
        except (ValueError, AttributeError):
            continue  # a torn last line of a killed run
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())


def append_line(path: Path, line: str) -> None:
    """Append one line to a log; a full disk or lost permission is a one-line UserError (the run's
    checkpoints are untouched: they are written atomically, apart from the logs)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {write_error(e) or e}; the run's checkpoints are untouched, "
                        f"rerun to resume") from None


class RunLog:
    """log.txt + the console (rich when it is a terminal, plain lines otherwise)."""

    def __init__(self, run_dir: Path, console: Any = None, enabled: bool = True):
        from rich.console import Console

        self.path = run_dir / LOG
        self.console = console if console is not None else Console(stderr=True)
        self.enabled = enabled

    @property
    def interactive(self) -> bool:
        return bool(self.enabled and self.console.is_terminal)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        append_line(self.path, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}")
        self.console.print(msg, markup=False, highlight=False, soft_wrap=True)
