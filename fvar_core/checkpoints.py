"""The fvar checkpoint format (DESIGN §10) and conversion to and from official VAR `.pth` files.

A checkpoint is a directory:

    config.json         {"format": "fvar-checkpoint", "format_version": 1, "kind": ..., "preset": {...},
                         "provenance": {"fvar_version", "created" (UTC ISO), "source", "step", ...},
                         "files": {name: {"bytes", "sha256"}} of the other files (absent before v0.2)}
    model.safetensors   the weights (no pickle is ever needed to load them)
    training_state.pt   optional: optimizer / scheduler / RNG state for resuming

`save_checkpoint` is atomic: everything is written into a sibling temporary directory, fsynced,
then renamed into place; an existing checkpoint is renamed aside first and removed only once the new
one is in place. Loading verifies the recorded sizes and checksums first (`verify_checkpoint`), so
a damaged file is named as such rather than half-read. Official `.pth` files are read with
`weights_only=True` only.
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
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, check_writable, umask, write_error
from .config import Preset
from .errors import UserError
from .hashing import file_sha256
from .presets import list_presets, load_preset, validate

FORMAT = "fvar-checkpoint"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_STATE_NAME = "training_state.pt"
KINDS = ("tokenizer", "var", "teacher", "classifier")
PRESETLESS_KINDS = ("classifier",)  # their config.json holds their own architecture, not a preset

DEFAULT_TOKENIZER_PRESET = "var-d16-256"  # the preset of the official vae_ch160v4096z32.pth
DEFAULT_VAR_PRESET = "var-d16-256"

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
        from . import __version__
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
                    extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write an fvar checkpoint directory atomically and return its path.

    An existing fvar checkpoint (or empty directory) at `directory` is replaced; anything else
    there is refused. `training_state` (optional, e.g. optimizer state) goes to training_state.pt
    in the same atomic step. On ENOSPC nothing is overwritten and a UserError says so. `extra`:
    more top-level config.json entries (a classifier's architecture, which has no preset).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (preset is None) != (kind in PRESETLESS_KINDS):
        raise ValueError(f"a {kind} checkpoint {'has no' if kind in PRESETLESS_KINDS else 'needs a'} preset")
    target = check_checkpoint_target(directory)
    prov = {"fvar_version": _fvar_version(), "created": _utc_now()}
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
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is corrupt: not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{cfg_path} is corrupt: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {cfg_path}: {e.strerror or e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{cfg_path} is not an fvar checkpoint config (format {got!r}, expected {FORMAT!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{cfg_path} is corrupt: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise UserError(f"{d} was written by a newer fvar (checkpoint format {version}; this fvar reads up to "
                        f"{FORMAT_VERSION}): upgrade fvar")
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


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def load_checkpoint(path: PathLike, expect_kind: Optional[str] = None, device: Union[str, torch.device] = "cpu"
                    ) -> Checkpoint:
    """Read an fvar checkpoint (the directory, or its config.json / model.safetensors).

    Every way the input can be wrong is a one-line UserError: missing path or weights, corrupt JSON
    or safetensors, another format, a newer format version, the wrong kind, an invalid preset.
    """
    d, data = read_checkpoint_config(path)
    kind = data["kind"]
    if expect_kind is not None and kind != expect_kind:
        raise UserError(f"{d} is {_article(kind)} {kind} checkpoint, expected {_article(expect_kind)} {expect_kind}")
    preset = validate(data["preset"], f"checkpoint {d} preset") if kind not in PRESETLESS_KINDS else None
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
    return _torch_load_weights_only(f)


# --------------------------------------------------------------------------------- build models
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


def build_tokenizer(ckpt: Checkpoint):
    """The Tokenizer of a tokenizer checkpoint, weights loaded (strict)."""
    from .tokenizer import Tokenizer

    if ckpt.kind != "tokenizer":
        raise UserError(f"{ckpt.path} is {_article(ckpt.kind)} {ckpt.kind} checkpoint, expected a tokenizer")
    tok = Tokenizer.from_config(ckpt.preset.tokenizer, ckpt.preset.patch_nums)
    load_strict(tok, ckpt.state_dict, f"checkpoint {ckpt.path}")
    return tok


def _transformer_module():
    """fvar_core.transformer if it provides VAR with official-format loading, else None."""
    try:
        from . import transformer
    except ImportError:
        return None
    var = getattr(transformer, "VAR", None)
    if var is None or not hasattr(var, "from_config") or not hasattr(var, "load_official_state_dict"):
        return None
    return transformer


def build_var(ckpt: Checkpoint, attn_backend: str = "auto"):
    """The VAR transformer of a var checkpoint, weights loaded (strict)."""
    if ckpt.kind != "var":
        raise UserError(f"{ckpt.path} is {_article(ckpt.kind)} {ckpt.kind} checkpoint, expected a var")
    tr = _transformer_module()
    if tr is None:
        raise UserError("this fvar has no VAR transformer yet (fvar_core.transformer)")
    p = ckpt.preset
    model = tr.VAR.from_config(p.model, p.patch_nums, p.tokenizer.vocab_size, p.tokenizer.z_channels,
                               attn_backend=attn_backend)
    load_strict(model, ckpt.state_dict, f"checkpoint {ckpt.path}")
    return model


# ------------------------------------------------------------------------------ official .pth
_TENSOR_DICT_KEYS = ("model", "state_dict", "module", "net", "vae", "var")


def _torch_load_weights_only(path: Path) -> Any:
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


def _is_tensor_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def read_official_pth(path: PathLike) -> StateDict:
    """An official VAR `.pth` → its state dict {key: tensor} (CPU), read with weights_only=True.

    A file holding a dict that wraps exactly one state dict (under 'model', 'state_dict', ...,
    next to plain metadata such as an epoch number) is unwrapped; anything ambiguous is refused. A
    DDP 'module.' prefix on every key is removed.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such file: {p}" if not p.exists() else f"{p} is not a file")
    obj = _torch_load_weights_only(p)
    if not isinstance(obj, dict):
        raise UserError(f"{p} holds a {type(obj).__name__}, not a state dict")
    if not _is_tensor_dict(obj):
        nested = [k for k, v in obj.items() if _is_tensor_dict(v)]
        if len(nested) > 1:
            preferred = [k for k in nested if k in _TENSOR_DICT_KEYS]
            raise UserError(f"{p} holds several state dicts ({', '.join(map(str, nested))}); "
                            f"cannot tell which one to convert" + (f" ({preferred[0]}?)" if len(preferred) == 1 else ""))
        if not nested:
            raise UserError(f"{p} holds no state dict (a mapping of parameter names to tensors); top-level "
                            f"keys: {', '.join(map(str, list(obj)[:6]))}")
        other_tensors = [k for k, v in obj.items() if k != nested[0] and isinstance(v, (torch.Tensor, dict))]
        if other_tensors:
            raise UserError(f"{p}: the state dict under {nested[0]!r} sits beside other tensors "
                            f"({', '.join(map(str, other_tensors[:4]))}); cannot tell what to convert")
        obj = obj[nested[0]]
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def detect_official_kind(sd: Mapping[str, torch.Tensor]) -> str:
    """'tokenizer' (VQVAE: encoder./decoder./quantize.) or 'var' (transformer: blocks./head.)."""
    tok = any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd)
    var = any(k.startswith(("blocks.", "head.")) for k in sd)
    if tok and var:
        raise UserError("the state dict mixes VQ-VAE keys (encoder./decoder./quantize.) and VAR keys "
                        "(blocks./head.): convert them as separate files")
    if tok:
        return "tokenizer"
    if var:
        return "var"
    raise UserError("not an official VAR or VQ-VAE state dict: no encoder./decoder./quantize. or blocks./head. "
                    f"keys (first keys: {', '.join(list(sd)[:4]) or 'none'})")


def _need(sd: Mapping[str, torch.Tensor], key: str, ndim: int, what: str) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise UserError(f"not an official {what} state dict: missing {key}")
    if t.ndim != ndim:
        raise UserError(f"not an official {what} state dict: {key} has shape {tuple(t.shape)}")
    return t


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers N of keys 'prefixN.…'."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def official_tokenizer_overrides(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The architecture of an official VQ-VAE state dict as `--set` overrides.

    ch from encoder.conv_in (C, 3, 3, 3), V and Cz from quantize.embedding (V, Cz), Cz checked
    against quant_conv, ch_mult and num_res_blocks from the encoder's down blocks, the φ sharing
    from the quant_resi keys; no alias codebook (the official format has none).
    """
    what = "VQ-VAE"
    ch = int(_need(sd, "encoder.conv_in.weight", 4, what).shape[0])
    emb = _need(sd, "quantize.embedding.weight", 2, what)
    vocab, z = int(emb.shape[0]), int(emb.shape[1])
    qc = _need(sd, "quant_conv.weight", 4, what)
    if tuple(qc.shape[:2]) != (z, z):
        raise UserError(f"inconsistent VQ-VAE state dict: quant_conv.weight {tuple(qc.shape)} does not match the "
                        f"codebook's {z} channels (quantize.embedding.weight {tuple(emb.shape)})")
    levels = _indices(sd, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise UserError(f"not an official {what} state dict: encoder.down.N blocks missing or not numbered 0..N-1")
    ch_mult = []
    for i in levels:
        w = _need(sd, f"encoder.down.{i}.block.0.conv1.weight", 4, what)
        if w.shape[0] % ch:
            raise UserError(f"inconsistent VQ-VAE state dict: encoder.down.{i} has {w.shape[0]} channels, "
                            f"not a multiple of ch={ch}")
        ch_mult.append(int(w.shape[0]) // ch)
    n_res = len(_indices(sd, "encoder.down.0.block."))
    overrides = [f"tokenizer.ch={ch}", f"tokenizer.vocab_size={vocab}", f"tokenizer.z_channels={z}",
                 "tokenizer.alias_vocab_size=0", f"tokenizer.ch_mult=[{', '.join(map(str, ch_mult))}]",
                 f"tokenizer.num_res_blocks={n_res}"]
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in sd):
        overrides.append(f"tokenizer.share_quant_resi={len(_indices(sd, 'quantize.quant_resi.qresi_ls.'))}")
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in sd):
        overrides.append("tokenizer.share_quant_resi=1")
    elif _indices(sd, "quantize.quant_resi."):
        overrides.append("tokenizer.share_quant_resi=0")
    return overrides


def official_var_overrides(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The architecture of an official VAR transformer state dict as `--set` overrides.

    depth = number of blocks, width C and Cz from word_embed (C, Cz), V from head (V, C), classes
    from class_emb (classes + 1, C), shared AdaLN from ada_gss keys, heads from scale_mul_1H11
    (1, H, 1, 1) when attention is l2-normalised (else VAR's heads = depth), mlp_ratio from fc1.
    """
    what = "VAR"
    depth = len(_indices(sd, "blocks."))
    if depth == 0:
        raise UserError("not an official VAR state dict: no blocks.N keys")
    we = _need(sd, "word_embed.weight", 2, what)
    width, z = int(we.shape[0]), int(we.shape[1])
    vocab = int(_need(sd, "head.weight", 2, what).shape[0])
    classes = int(_need(sd, "class_emb.weight", 2, what).shape[0]) - 1
    shared_aln = any(".ada_gss" in k for k in sd)
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    heads = int(sd["blocks.0.attn.scale_mul_1H11"].shape[1]) if l2 else depth
    fc1 = _need(sd, "blocks.0.ffn.fc1.weight", 2, what)
    mlp_ratio = fc1.shape[0] / width
    return [f"model.depth={depth}", f"model.width={width}", f"model.num_heads={heads}",
            f"model.num_classes={classes}", f"model.shared_aln={str(shared_aln).lower()}",
            f"model.attn_l2_norm={str(l2).lower()}", f"model.mlp_ratio={mlp_ratio!r}",
            f"tokenizer.vocab_size={vocab}", f"tokenizer.z_channels={z}"]


def _default_var_preset(sd: Mapping[str, torch.Tensor]) -> str:
    """The vanilla var-d{depth}-* preset whose sequence length matches pos_1LC (1, L, C)."""
    depth = len(_indices(sd, "blocks."))
    pos = sd.get("pos_1LC")
    L = int(pos.shape[1]) if isinstance(pos, torch.Tensor) and pos.ndim == 3 else None
    for name in list_presets():
        if name.startswith(f"var-d{depth}-") and (L is None or load_preset(name).seq_len == L):
            return name
    return DEFAULT_VAR_PRESET


@dataclass
class ConversionReport:
    """What `import_official` / `export_official` did, for the CLI to print."""

    kind: str
    architecture: str
    num_tensors: int
    out: Path
    preset: str = ""


def _describe(kind: str, preset: Preset) -> str:
    if kind == "tokenizer":
        t = preset.tokenizer
        alias = f"+{t.alias_vocab_size} alias" if t.alias_vocab_size else ""
        return (f"VQ-VAE ch={t.ch} ch_mult={list(t.ch_mult)} z={t.z_channels} V={t.vocab_size}{alias}, "
                f"{preset.num_scales} scales up to {preset.patch_nums[-1]}x{preset.patch_nums[-1]} "
                f"({preset.resolution}px)")
    m = preset.model
    return (f"VAR depth={m.depth} width={m.width} heads={m.num_heads} V={preset.tokenizer.vocab_size} "
            f"classes={m.num_classes}{' shared-AdaLN' if m.shared_aln else ''}, {preset.num_scales} scales "
            f"({preset.seq_len} tokens, {preset.resolution}px)")


def _check_replace(out: Path, kind: str, overwrite: bool) -> None:
    """An existing checkpoint at `out` is replaced only by one of its kind, and only when asked."""
    if not (out.is_dir() and (out / CONFIG_NAME).is_file()):
        return
    try:
        old = read_checkpoint_config(out)[1]["kind"]
    except UserError:
        old = None
    if old is not None and old != kind:
        raise UserError(f"--out {out} holds {_article(old)} {old} checkpoint; refusing to replace it with "
                        f"{_article(kind)} {kind} (choose another --out)")
    if not overwrite:
        raise UserError(f"--out {out} already holds {_article(kind)} {kind} checkpoint: pass --overwrite to replace it")


def import_official(src: PathLike, out: PathLike, preset_name: Optional[str] = None,
                    overrides: Iterable[str] = (), overwrite: bool = False) -> ConversionReport:
    """Official VAR `.pth` (VQ-VAE or transformer) → fvar checkpoint directory.

    The architecture is read off the state dict and set on the preset (default: var-d16-256 for a
    VQ-VAE, the var-d{depth} preset of matching length for a transformer); the user's overrides
    apply after it. The weights go through the model's strict official loader before saving. An
    existing checkpoint at `out` is replaced only if it is of the same kind and `overwrite`.
    """
    src, out = Path(src), Path(out)
    check_checkpoint_target(out)
    sd = read_official_pth(src)
    kind = detect_official_kind(sd)
    _check_replace(out, kind, overwrite)
    if kind == "tokenizer":
        from .tokenizer import Tokenizer, load_official_state_dict

        name = preset_name or DEFAULT_TOKENIZER_PRESET
        preset = load_preset(name, [*official_tokenizer_overrides(sd), *overrides])
        model = Tokenizer.from_config(preset.tokenizer, preset.patch_nums)
        load_official_state_dict(model, sd)
    else:
        tr = _transformer_module()
        if tr is None:
            raise UserError(f"{src} is a VAR transformer checkpoint; transformer conversion arrives with the "
                            f"transformer (fvar_core.transformer), only VQ-VAE files convert for now")
        name = preset_name or _default_var_preset(sd)
        preset = load_preset(name, [*official_var_overrides(sd), *overrides])
        pos = sd.get("pos_1LC")
        if isinstance(pos, torch.Tensor) and pos.ndim == 3 and pos.shape[1] != preset.seq_len:
            raise UserError(f"{src} has {pos.shape[1]} tokens per image, preset '{name}' has {preset.seq_len} "
                            f"(patch_nums {list(preset.patch_nums)}): choose the preset of its resolution with --preset")
        model = tr.VAR.from_config(preset.model, preset.patch_nums, preset.tokenizer.vocab_size,
                                   preset.tokenizer.z_channels)
        model.load_official_state_dict(sd)
    state = model.state_dict()
    provenance = {"source": {"file": src.name, "sha256": file_sha256(src), "format": "official VAR .pth"},
                  "step": None, "converted_with_preset": name}
    out = save_checkpoint(out, kind=kind, preset=preset, state_dict=state, provenance=provenance)
    return ConversionReport(kind=kind, architecture=_describe(kind, preset), num_tensors=len(state), out=out,
                            preset=name)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """torch.save via a temporary file in the same folder + rename: never a half-written file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the .pth file to write")
    atomic_write(path, lambda f: torch.save(obj, f))


def official_state_dict_of(ckpt: Checkpoint) -> StateDict:
    """The official-format state dict of a tokenizer or var checkpoint (exactly the official keys)."""
    if ckpt.kind == "tokenizer":
        from .tokenizer import official_state_dict
        return official_state_dict(build_tokenizer(ckpt))
    if ckpt.kind == "var":
        return build_var(ckpt).official_state_dict()
    raise UserError(f"{ckpt.path} is a {ckpt.kind} checkpoint: only tokenizer and var checkpoints have an "
                    f"official VAR format")


def export_official(ckpt_path: PathLike, out: PathLike, overwrite: bool = False) -> ConversionReport:
    """fvar tokenizer / var checkpoint → official VAR `.pth` (torch.save of the official state dict);
    an existing file at `out` is replaced only with `overwrite`."""
    out = check_writable(out, "--out")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists: pass --overwrite to replace it")
    ckpt = load_checkpoint(ckpt_path)
    sd = official_state_dict_of(ckpt)
    atomic_torch_save(sd, out)
    return ConversionReport(kind=ckpt.kind, architecture=_describe(ckpt.kind, ckpt.preset), num_tensors=len(sd),
                            out=out, preset=ckpt.preset.name)
