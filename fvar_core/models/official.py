"""Official VAR `.pth` files ⇄ fvar checkpoints (`fvar convert`), exactly, in both directions:
files read with weights_only, the kind and architecture read off the state dict.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from fvar_core.atomic import atomic_write, check_writable
from fvar_core.checkpoints import (CONFIG_NAME, Checkpoint, StateDict, article, check_checkpoint_target,
                                   load_checkpoint, read_checkpoint_config, save_checkpoint, torch_load_weights_only)
from fvar_core.config import Preset
from fvar_core.errors import UserError
from fvar_core.hashing import file_sha256
from fvar_core.models.loading import build_tokenizer, build_var
from fvar_core.presets import list_presets, load_preset
from fvar_core.models.tokenizer import Tokenizer
from fvar_core.models.transformer import VAR

PathLike = Union[str, Path]
DEFAULT_TOKENIZER_PRESET = "var-d16-256"  # the preset of the official vae_ch160v4096z32.pth
DEFAULT_VAR_PRESET = "var-d16-256"
OFFICIAL_SUFFIXES = (".pth", ".pt")  # what a path to an official file (not an fvar folder) ends with

_TENSOR_DICT_KEYS = ("model", "state_dict", "module", "net", "vae", "var")


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
    obj = torch_load_weights_only(p)
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


def default_var_preset(sd: Mapping[str, torch.Tensor]) -> str:
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
        raise UserError(f"--out {out} holds {article(old)} {old} checkpoint; refusing to replace it with "
                        f"{article(kind)} {kind} (choose another --out)")
    if not overwrite:
        raise UserError(f"--out {out} already holds {article(kind)} {kind} checkpoint: pass --overwrite to replace it")


@dataclass
class OfficialModel:
    """An official `.pth` built into its fvar model (weights loaded strictly, on the CPU)."""

    kind: str                  # "tokenizer" or "var"
    preset: Preset             # the preset its architecture was read into
    preset_name: str
    model: torch.nn.Module     # Tokenizer or VAR
    provenance: dict           # {"source": {file, sha256, format}, "step": None, "converted_with_preset"}


def load_official(src: PathLike, preset_name: Optional[str] = None, overrides: Iterable[str] = (),
                  expect_kind: Optional[str] = None, sd: Optional[StateDict] = None,
                  sha256: Optional[str] = None) -> OfficialModel:
    """Official VAR `.pth` (VQ-VAE or transformer) → its fvar model, without writing anything.

    The architecture is read off the state dict and set on the preset (default: var-d16-256 for a
    VQ-VAE, the var-d{depth} preset of matching length for a transformer); the user's overrides
    apply after it. The weights go through the model's strict official loader. `sd` / `sha256`:
    the file's state dict and checksum when the caller has them already (each costs a read)."""
    src = Path(src)
    sd = read_official_pth(src) if sd is None else sd
    kind = detect_official_kind(sd)
    if expect_kind is not None and kind != expect_kind:
        raise UserError(f"{src} is an official {'VQ-VAE' if kind == 'tokenizer' else 'VAR transformer'} file, "
                        f"expected {'a VQ-VAE' if expect_kind == 'tokenizer' else 'a VAR transformer'}")
    if kind == "tokenizer":
        name = preset_name or DEFAULT_TOKENIZER_PRESET
        preset = load_preset(name, [*official_tokenizer_overrides(sd), *overrides])
        model = Tokenizer(preset.tokenizer, preset.patch_nums)
        model.load_official_state_dict(sd)
    else:
        name = preset_name or default_var_preset(sd)
        preset = load_preset(name, [*official_var_overrides(sd), *overrides])
        pos = sd.get("pos_1LC")
        if isinstance(pos, torch.Tensor) and pos.ndim == 3 and pos.shape[1] != preset.seq_len:
            raise UserError(f"{src} has {pos.shape[1]} tokens per image, preset '{name}' has {preset.seq_len} "
                            f"(patch_nums {list(preset.patch_nums)}): choose the preset of its resolution with --preset")
        model = VAR(preset.model, preset.patch_nums, preset.tokenizer.vocab_size, preset.tokenizer.z_channels)
        model.load_official_state_dict(sd)
    provenance = {"source": {"file": src.name, "sha256": sha256 or file_sha256(src), "format": "official VAR .pth"},
                  "step": None, "converted_with_preset": name}
    return OfficialModel(kind, preset, name, model, provenance)


def import_official(src: PathLike, out: PathLike, preset_name: Optional[str] = None,
                    overrides: Iterable[str] = (), overwrite: bool = False,
                    sha256: Optional[str] = None) -> ConversionReport:
    """Official VAR `.pth` → fvar checkpoint directory (`load_official`, then saved). An existing
    checkpoint at `out` is replaced only if it is of the same kind and `overwrite` (checked before
    the model is built). sha256: the file's, when the caller has computed it."""
    src, out = Path(src), Path(out)
    check_checkpoint_target(out)
    sd = read_official_pth(src)
    _check_replace(out, detect_official_kind(sd), overwrite)
    m = load_official(src, preset_name, overrides, sd=sd, sha256=sha256)
    kind, preset, name = m.kind, m.preset, m.preset_name
    state = m.model.state_dict()
    out = save_checkpoint(out, kind=kind, preset=preset, state_dict=state, provenance=m.provenance)
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
        return build_tokenizer(ckpt).official_state_dict()
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
