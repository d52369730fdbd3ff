"""The fvar checkpoint format (docs/design.md §10): a folder holding config.json plus safetensors weights.

A checkpoint is a directory:

    config.json         {"format": "fvar-checkpoint", "format_version": 1, "kind": ..., "preset": {...},
                         "provenance": {"fvar_version", "created" (UTC ISO), "environment" (torch, cuda,
                                        gpus, git_commit, command), "source", "step", ...},
                         "files": {name: {"bytes", "sha256"}} of the other files (absent before v0.2)}
    model.safetensors   the weights (no pickle is ever needed to load them)
    training_state.pt   optional: optimizer / scheduler / RNG state for resuming

`save_checkpoint` is atomic: everything is written into a sibling temporary directory, fsynced,
then renamed into place; an existing checkpoint is renamed aside first and removed only once the new
one is in place. Loading verifies the recorded sizes and checksums first (`verify_checkpoint`), so
a damaged file is named as such rather than half-read. Building models from a checkpoint is
`model_loading`; official `.pth` files are `official`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from fvar_core.atomic import umask, write_error
from fvar_core.config import Preset
from fvar_core.environment import provenance as environment_provenance
from fvar_core.errors import UserError
from fvar_core.hashing import file_sha256
from fvar_core.jsondocs import read_json_doc
from fvar_core.modelcard import CARD_NAME, model_card
from fvar_core.presets import validate

FORMAT = "fvar-checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_STATE_NAME = "training_state.pt"
KINDS = ("tokenizer", "var", "teacher", "classifier")
PRESETLESS_KINDS = ("classifier",)  # their config.json holds their own architecture, not a preset


PathLike = Union[str, Path]
StateDict = dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    """A loaded fvar checkpoint (weights on CPU unless asked otherwise)."""

    path: Path  # the checkpoint directory
    kind: str
    preset: Optional[Preset]  # None for PRESETLESS_KINDS
    state_dict: StateDict
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # config.json's other top-level entries


def _fvar_version() -> str:
    try:
        from importlib.metadata import version
        return version("fvar")
    except Exception:  # running from a source tree that is not installed
        from fvar_core import __version__
        return __version__


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ------------------------------------------------------------------------------------------- save
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _for_safetensors(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """safetensors refuses non-contiguous tensors and tensors sharing storage: copy only those."""
    out: StateDict = {}
    seen: set[int] = set()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        whole = v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()
        if not whole or (ptr is not None and ptr in seen):
            v = v.contiguous().clone()
            ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None:
            seen.add(ptr)
        out[k] = v
    return out


def _is_fvar_checkpoint_dir(path: Path) -> bool:
    try:
        data = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def check_checkpoint_target(directory: PathLike) -> Path:
    """The path a checkpoint may be written to (absent, empty, or an fvar checkpoint to replace);
    anything else is a UserError — callers check it before long work, `save_checkpoint` again."""
    target = Path(directory)
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise UserError(f"{target} exists and is not a checkpoint directory; refusing to replace it")
        if any(target.iterdir()) and not _is_fvar_checkpoint_dir(target):
            raise UserError(f"{target} exists and is not an fvar checkpoint; refusing to replace it "
                            f"(choose another --out or remove it)")
    return target


def save_checkpoint(directory: PathLike, *, kind: str, preset: Optional[Preset],
                    state_dict: Mapping[str, torch.Tensor], provenance: Optional[Mapping[str, Any]] = None,
                    training_state: Optional[Mapping[str, Any]] = None,
                    extra: Optional[Mapping[str, Any]] = None, classes: Optional[Sequence[str]] = None) -> Path:
    """Write an fvar checkpoint directory atomically and return its path.

    An existing fvar checkpoint (or empty directory) at `directory` is replaced; anything else
    there is refused. `training_state` (optional, e.g. optimizer state) goes to training_state.pt
    in the same atomic step. On ENOSPC nothing is overwritten and a UserError says so. `extra`:
    more top-level config.json entries (a classifier's architecture, which has no preset).
    The model card (`modelcard.model_card`, README.md) is written in the same step; `classes`
    (the class names, when known) appear in it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (preset is None) != (kind in PRESETLESS_KINDS):
        raise ValueError(f"a {kind} checkpoint {'has no' if kind in PRESETLESS_KINDS else 'needs a'} preset")
    target = check_checkpoint_target(directory)
    prov = {"fvar_version": _fvar_version(), "created": _utc_now(), "environment": environment_provenance()}
    prov.update(provenance or {})
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
              **({"preset": preset.model_dump(mode="json")} if preset is not None else {}),
              **dict(extra or {}), "provenance": prov}
    json.dumps(config)  # a value JSON cannot hold fails here, before any file is touched
    tensors = _for_safetensors(state_dict)

    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    except OSError as e:
        raise UserError(f"cannot write checkpoint {target}: {write_error(e) or e}") from None
    aside: Optional[Path] = None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700 directories
        weights = tmp / WEIGHTS_NAME
        save_file(tensors, str(weights), metadata={"format": "pt", "fvar_kind": kind})
        _fsync_path(weights)
        if training_state is not None:
            with open(tmp / TRAINING_STATE_NAME, "wb") as f:
                torch.save(dict(training_state), f)
                f.flush()
                os.fsync(f.fileno())
        # sizes and sha256 of what was written: `verify_checkpoint` tells a truncated or damaged
        # file from a good one before anything trusts it
        config["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                           for p in (weights, tmp / TRAINING_STATE_NAME) if p.is_file()}
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / CARD_NAME, "w", encoding="utf-8") as f:  # documentation: not in "files", never verified
            f.write(model_card(kind, preset, prov, classes))
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        if target.exists():
            # Rename the old one aside (never delete first): a crash now leaves it beside the target.
            aside = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.old-"))
            os.replace(target, aside)
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not target.exists():
            os.replace(aside, target)  # put the old checkpoint back
            aside = None
        reason = write_error(e)
        if reason is not None:  # torch.save and safetensors report a full disk without an errno
            raise UserError(f"cannot write checkpoint {target}: {reason}; nothing was overwritten") from None
        raise
    try:
        _fsync_path(parent)  # make the renames durable; best effort (some filesystems refuse)
    except OSError:
        pass
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------- load
def _checkpoint_dir(path: PathLike) -> Path:
    p = Path(path)
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        return p.parent
    if not p.exists():
        hint = ""
        leftovers = sorted(p.parent.glob(f".{p.name}.old-*")) if p.parent.is_dir() else []
        if leftovers:
            hint = f" (an interrupted save left the previous checkpoint at {leftovers[-1]}; rename it back)"
        raise UserError(f"no checkpoint at {p}{hint}")
    if p.is_file():
        extra = (" (an official .pth file: convert it first with `fvar convert import`)"
                 if p.suffix in (".pth", ".pt", ".bin", ".ckpt") else "")
        raise UserError(f"{p} is not an fvar checkpoint: expected a directory holding {CONFIG_NAME} and "
                        f"{WEIGHTS_NAME}{extra}")
    return p


def read_checkpoint_config(path: PathLike) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, its checked config.json mapping) without reading the weights."""
    d = _checkpoint_dir(path)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise UserError(f"{d} has no {CONFIG_NAME}: not an fvar checkpoint")
    data = read_json_doc(cfg_path, FORMAT, FORMAT_VERSION, what="an fvar checkpoint config", name="checkpoint",
                         version_key="format_version", subject=d)
    if data.get("kind") not in KINDS:
        raise UserError(f"{cfg_path}: unknown checkpoint kind {data.get('kind')!r} (expected one of "
                        f"{', '.join(KINDS)})")
    if data["kind"] not in PRESETLESS_KINDS and not isinstance(data.get("preset"), dict):
        raise UserError(f"{cfg_path} is corrupt: no preset mapping")
    if not isinstance(data.get("provenance", {}), dict):
        raise UserError(f"{cfg_path} is corrupt: provenance is not a mapping")
    return d, data


_VERIFIED: dict[tuple, None] = {}  # (file, size, mtime_ns, sha256) already checked by this process


def verify_checkpoint(path: PathLike) -> Optional[str]:
    """None if the checkpoint's config.json reads, its weights are there, and every file it records
    that is present has its recorded size and sha256; else the reason, in a few words. A checkpoint
    written before checksums were recorded passes when its safetensors header reads."""
    try:
        d, data = read_checkpoint_config(path)
    except UserError as e:
        return str(e)
    files = data.get("files")
    if not isinstance(files, dict):
        weights = d / WEIGHTS_NAME
        if not weights.is_file():
            return f"{WEIGHTS_NAME} missing"
        try:
            from safetensors import safe_open
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as e:  # SafetensorError: a truncated or damaged header
            return (f"{WEIGHTS_NAME} is unreadable or corrupt "
                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        return None
    for name, rec in sorted(files.items()):
        f = d / name
        if not f.is_file():
            if name == WEIGHTS_NAME:
                return f"{name} missing"
            continue  # a weights-only copy (a run's tokenizer/): the training state is optional
        st = f.stat()
        if st.st_size != rec.get("bytes"):
            return (f"{name} is unreadable or corrupt ({st.st_size} bytes, {rec.get('bytes')} were written: "
                    f"truncated or replaced)")
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns, rec.get("sha256"))
        if key not in _VERIFIED:
            if file_sha256(f) != rec.get("sha256"):
                return f"{name} is unreadable or corrupt (its sha256 differs from the one recorded at save time)"
            _VERIFIED[key] = None
    return None


def article(kind: str) -> str:
    """"a" or "an", for messages that name a checkpoint kind."""
    return "an" if kind[0] in "aeiou" else "a"


def _preset_of(d: Path, data: Mapping[str, Any]) -> Optional[Preset]:
    """The validated preset of a checkpoint's config.json mapping (None for PRESETLESS_KINDS)."""
    return validate(data["preset"], f"checkpoint {d} preset") if data["kind"] not in PRESETLESS_KINDS else None


def load_checkpoint(path: PathLike, expect_kind: Optional[str] = None, device: Union[str, torch.device] = "cpu"
                    ) -> Checkpoint:
    """Read an fvar checkpoint (the directory, or its config.json / model.safetensors).

    Every way the input can be wrong is a one-line UserError: missing path or weights, corrupt JSON
    or safetensors, another format, a newer format version, the wrong kind, an invalid preset.
    """
    d, data = read_checkpoint_config(path)
    kind = data["kind"]
    if expect_kind is not None and kind != expect_kind:
        raise UserError(f"{d} is {article(kind)} {kind} checkpoint, expected {article(expect_kind)} {expect_kind}")
    preset = _preset_of(d, data)
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{d} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    problem = verify_checkpoint(d)
    if problem is not None:
        raise UserError(f"checkpoint {d}: {problem}")
    try:
        state_dict = load_file(str(weights), device=str(device))
    except Exception as e:  # SafetensorError, OSError, ...: the file, not the program, is wrong
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{weights} is unreadable or corrupt ({detail})") from None
    extra = {k: v for k, v in data.items()
             if k not in ("format", "format_version", "kind", "preset", "provenance", "files")}
    return Checkpoint(path=d, kind=kind, preset=preset, state_dict=state_dict,
                      provenance=dict(data.get("provenance", {})), extra=extra)


def load_training_state(path: PathLike) -> Optional[dict[str, Any]]:
    """The checkpoint's training_state.pt (tensors and plain data, weights_only), or None."""
    d = _checkpoint_dir(path)
    f = d / TRAINING_STATE_NAME
    if not f.is_file():
        return None
    return torch_load_weights_only(f)


def torch_load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        globals_ = re.findall(r"GLOBAL (\S+)", text)
        if "allowed global" in text or "Unsupported global" in text or globals_:
            what = f" ({', '.join(dict.fromkeys(globals_))})" if globals_ else ""
            raise UserError(f"refused: {path} contains pickled Python objects{what}, not only tensors; fvar loads "
                            f".pth files with weights_only=True") from None
        kind = "zip archive" if zipfile.is_zipfile(path) else "file"
        raise UserError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated {kind})") from None


@dataclass
class KeyDiff:
    """How a state dict differs from a model's: keys it lacks, keys the model lacks, shapes that differ."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # "key (checkpoint shape) vs model (model shape)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)


def key_diff(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> KeyDiff:
    """Compare a state dict with the model's own (`own`), in the model's key order."""
    return KeyDiff(missing=[k for k in own if k not in given],
                   unexpected=[k for k in given if k not in own],
                   mismatched=[f"{k} {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
                               for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape)])


def list_keys(keys: list[str], limit: int = 6) -> str:
    """The first `limit` keys, comma-separated, and how many more."""
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict) with a one-line UserError naming the first mismatch."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in state_dict:
            raise UserError(f"{where} does not fit its model: missing key {k} (model shape {tuple(v.shape)})")
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise UserError(f"{where} does not fit its model: {k} has shape {tuple(state_dict[k].shape)} in the "
                            f"checkpoint, {tuple(v.shape)} in the model")
    extra = [k for k in state_dict if k not in own]
    if extra:
        raise UserError(f"{where} does not fit its model: unexpected key {extra[0]} "
                        f"(shape {tuple(state_dict[extra[0]].shape)})"
                        + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    model.load_state_dict(state_dict, strict=True)


def card_for(checkpoint_dir: PathLike) -> str:
    """The model card of a checkpoint: its README.md, or one made from its config.json when it has
    none (checkpoints written before fvar wrote cards)."""
    d, data = read_checkpoint_config(checkpoint_dir)
    if (d / CARD_NAME).is_file():
        return (d / CARD_NAME).read_text(encoding="utf-8")
    return model_card(data["kind"], _preset_of(d, data), data.get("provenance", {}))

