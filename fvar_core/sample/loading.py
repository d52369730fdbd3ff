"""Model pairs: a transformer checkpoint with the tokenizer that decodes it, loaded on one device.

`load_models` finds the tokenizer by `runs.find_tokenizer`'s rule (or the one given), checks it
is the tokenizer the transformer was trained with (`checks.check_tokenizer_fits`) and records
both checkpoints' identities for the sidecars of everything sampled from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from fvar_core.bundle import default_model
from fvar_core.checks import check_tokenizer_fits, parse_classes
from fvar_core.classnames import names_for
from fvar_core.checkpoints import WEIGHTS_NAME, Checkpoint, load_checkpoint
from fvar_core.data.folders import read_class_index
from fvar_core.devices import pick_device
from fvar_core.errors import UserError
from fvar_core.hashing import file_sha256
from fvar_core.models.hub import resolve_source
from fvar_core.models.loading import build_tokenizer, build_var
from fvar_core.models.official import OFFICIAL_SUFFIXES, load_official
from fvar_core.runs import CLASS_INDEX, find_tokenizer, newest_checkpoint, resolve_checkpoint

PathLike = Union[str, Path]


def checkpoint_identity(ckpt) -> Dict[str, Any]:
    """What names a checkpoint in sidecars: path, weights sha256, preset, step, kind."""
    return {"path": str(Path(ckpt.path).resolve()), "kind": ckpt.kind,
            "sha256": file_sha256(Path(ckpt.path) / WEIGHTS_NAME), "preset": ckpt.preset.name,
            "step": ckpt.provenance.get("step")}


@dataclass
class Models:
    """A transformer with the tokenizer that decodes it, on one device, in eval mode."""

    var: Any
    tokenizer: Any
    var_ckpt: Any  # checkpoints.Checkpoint (state_dict dropped)
    tok_ckpt: Any
    device: torch.device
    identity: Dict[str, Any] = field(default_factory=dict)  # {"checkpoint": ..., "tokenizer": ...[, "refiner"]}
    refiner: Any = None  # a second transformer over the same tokens (draft and refine), or None

    @property
    def preset(self):
        return self.var_ckpt.preset

    @property
    def class_names(self) -> Optional[List[str]]:
        """What the classes are called (`classnames.names_for`: the checkpoint's class list, or
        ImageNet's for a 1,000-class model such as the official ones); None when unknown."""
        return names_for(class_names_for(self.var_ckpt.path), self.var.num_classes)

    def class_ids(self, classes, where: str = "--class") -> List[int]:
        """Class ids from ids, names or `--class` text (`checks.parse_classes`)."""
        return parse_classes(classes, self.var.num_classes, self.class_names, where)


def load_models(var_ckpt: PathLike, tokenizer: Optional[PathLike] = None, device=None) -> Models:
    """Load a var checkpoint (or run directory) and its tokenizer (runs.find_tokenizer's rule, or
    `tokenizer`), check they fit, move both to `device` (default: CUDA if available) in eval mode."""
    dev = device if isinstance(device, torch.device) else pick_device(device or "auto")
    ck = load_checkpoint(resolve_checkpoint(var_ckpt, "--ckpt"), expect_kind="var")
    tok_path = find_tokenizer(ck.path, ck.provenance, tokenizer)
    tk = load_checkpoint(tok_path, expect_kind="tokenizer")
    check_tokenizer_fits(ck.preset, tk.preset, f"tokenizer {tk.path}", interface_only=True,
                         hint=f"not the tokenizer {ck.path} was trained with: pass that one with --tokenizer")
    var = build_var(ck).to(dev).eval()
    tok = build_tokenizer(tk).to(dev).eval()
    identity = {"checkpoint": checkpoint_identity(ck), "tokenizer": checkpoint_identity(tk)}
    ck.state_dict, tk.state_dict = {}, {}  # the models hold the weights now
    return Models(var, tok, ck, tk, dev, identity)


def class_names_for(ckpt_dir: PathLike) -> Optional[List[str]]:
    """The run's class names: `classes.json` in the checkpoint directory, else in its run directory
    (two levels up: <run>/checkpoints/step-N); None when neither has one (or for an official file)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    for cand in (d / CLASS_INDEX, d.parent.parent / CLASS_INDEX):
        if cand.is_file():
            return read_class_index(cand)
    return None


def load_official_pair(var_pth: PathLike, vae_pth: PathLike, device=None, preset: Optional[str] = None,
                       overrides: Sequence[str] = ()) -> Models:
    """An official `var_d*.pth` and `vae_ch160v4096z32.pth` (or files of their format) as a model
    pair, converted in memory (nothing written; `fvar convert import` keeps a converted copy).
    `preset`/`overrides` as for `fvar convert import` of the transformer."""
    dev = device if isinstance(device, torch.device) else pick_device(device or "auto")
    v = load_official(var_pth, preset, overrides, expect_kind="var")
    t = load_official(vae_pth, expect_kind="tokenizer")
    check_tokenizer_fits(v.preset, t.preset, f"VQ-VAE {vae_pth}", interface_only=True,
                         hint=f"not the VQ-VAE of {var_pth}")
    cks = [Checkpoint(path=Path(p), kind=m.kind, preset=m.preset, state_dict={}, provenance=m.provenance)
           for p, m in ((var_pth, v), (vae_pth, t))]
    identity = {name: {"path": str(Path(p).resolve()), "kind": m.kind, "sha256": m.provenance["source"]["sha256"],
                       "preset": m.preset.name, "step": None}
                for name, p, m in (("checkpoint", var_pth, v), ("tokenizer", vae_pth, t))}
    return Models(v.model.to(dev).eval(), t.model.to(dev).eval(), cks[0], cks[1], dev, identity)


def open_models(source: PathLike, tokenizer: Optional[PathLike] = None, device=None, preset: Optional[str] = None,
                overrides: Sequence[str] = ()) -> Models:
    """Whatever names a generator → the model pair: an official `.pth` transformer (then `tokenizer`
    is the official VQ-VAE file; `preset`/`overrides` pick its architecture) or an fvar run /
    checkpoint (`load_models`; it carries its preset, so preset/overrides are refused)."""
    source, tokenizer = resolve_source(source, tokenizer)  # Hub names and hf:// URIs → local files
    src = Path(source)
    if src.suffix in OFFICIAL_SUFFIXES:
        if tokenizer is None:
            raise UserError(f"{src} is an official transformer file: give the official VQ-VAE .pth as the tokenizer")
        return load_official_pair(src, tokenizer, device, preset, overrides)
    if preset is not None or overrides:
        raise UserError("a preset applies to official .pth files only: an fvar checkpoint carries its own")
    return load_models(src, tokenizer, device)


def default_source(say=print) -> Union[Path, str]:
    """What to sample when no checkpoint is named, said in one line: the newest var checkpoint under
    the runs folder, else the model bundled with fvar; with neither, the runs folder's error."""
    try:
        ckpt = newest_checkpoint("var")
        say(f"using the newest var checkpoint: {ckpt}")
        return ckpt
    except UserError:
        name = default_model()
        if name is None:
            raise
        say(f"no --ckpt and no var checkpoint under the runs folder: using the bundled release {name}")
        return name


def same_token_space(a, b) -> bool:
    """Whether two tokenizers give tokens the same meaning: the same scales and quantizer (codebook
    and φ), equal up to half-precision storage (the bundled models keep float16 copies)."""
    if tuple(a.quantize.patch_nums) != tuple(b.quantize.patch_nums):
        return False
    qa, qb = a.quantize.state_dict(), b.quantize.state_dict()
    return qa.keys() == qb.keys() and all(
        qa[k].shape == qb[k].shape and torch.allclose(qa[k].float().cpu(), qb[k].float().cpu(), rtol=2 ** -10, atol=1e-6)
        for k in qa if qa[k].is_floating_point())


def attach_refiner(models: Models, source: PathLike, tokenizer: Optional[PathLike] = None) -> Models:
    """Load `source` as the refiner of draft-and-refine sampling (`SampleConfig.refine_from`), on the
    draft model's device; a model of another token space is one line. An official `.pth` refiner
    is read with the draft model's tokenizer unless `tokenizer` names one (official var_d30 +
    var_d16 share the VQ-VAE)."""
    if tokenizer is None and Path(str(source)).suffix in OFFICIAL_SUFFIXES:
        tokenizer = models.identity["tokenizer"]["path"]
    ref = open_models(source, tokenizer, models.device)
    if not same_token_space(models.tokenizer, ref.tokenizer):
        raise UserError(f"refiner {ref.identity['checkpoint']['path']} was trained on another tokenizer "
                        f"({ref.identity['tokenizer']['path']}) than {models.identity['checkpoint']['path']} "
                        f"({models.identity['tokenizer']['path']}): draft and refine share one tokenizer")
    models.refiner = ref.var
    models.identity["refiner"] = ref.identity["checkpoint"]
    return models
