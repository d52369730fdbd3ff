"""The alias path, audited (`fvar experiment alias-audit`, docs/alias-audit.md).

Three questions about a trained dual-path tokenizer and a distillation run:

    carried   per scale k, how large the alias residual a_k = area_down_k(E(x) − E(PSF_ρk ⋆ x)) is
              against the structure residual r_k = area_down_k(z_k − f̂_{k−1}) the structure
              codebook codes (ratio of mean squares, so the latent's overall scale cancels), and how
              much of a_k its codebook codes; beside it the same residual in image space, the
              paper's D_k − L_k, against the (mean-free) focus view L_k, and the rank correlation
              over images of the two (does the latent difference track the image residual?)
    used      perplexity and dead codes of the alias (and structure) codebook on real images
    read      the teacher's per-scale cross-entropy minus the student's on held-out tokens, with the
              true alias tokens and with alias tokens of *other* images (`shuffle_alias`: the same
              tokens, rows deranged within the batch; nothing else changes). If the shuffled tokens
              help as much, the teacher is not reading detail of the image it predicts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from fvar_core.checks import check_tokenizer_fits
from fvar_core.errors import UserError
from fvar_core.checkpoints import load_checkpoint, load_strict
from fvar_core.data.shards import TokenShards
from fvar_core.focus.pyramid import focus_views
from fvar_core.focus.schedules import radii
from fvar_core.models.loading import build_tokenizer
from fvar_core.models.teacher import Teacher
from fvar_core.presets import override_preset
from fvar_core.runs import resolve_checkpoint
from fvar_core.sample.loading import load_models

PathLike = Union[str, Path]


def code_usage(counts: np.ndarray) -> Dict[str, float]:
    """Histogram of code hits (V,) → perplexity exp(H) (V = uniform use), codes used, dead codes."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return {"perplexity": 0.0, "used": 0, "dead": int(counts.size), "size": int(counts.size)}
    p = counts[counts > 0] / total
    return {"perplexity": float(math.exp(-(p * np.log(p)).sum())), "used": int(p.size),
            "dead": int(counts.size - p.size), "size": int(counts.size)}


@torch.no_grad()
def tokenizer_audit(tokenizer: PathLike, images: torch.Tensor, *, overrides: Sequence[str] = (),
                    batch_size: int = 100, seed: int = 0, device: str = "cpu") -> Dict[str, Any]:
    """uint8 images (N, 3, R, R) through a tokenizer checkpoint's focus pyramid (its preset's, with
    `overrides`, e.g. pyramid.noise=false) → per-scale residual energies and codebook usage (see the
    module docstring). The pyramid noise, if on, is drawn from `seed`: the audit is deterministic.
    The image-space residual is the optics alone (no noise)."""
    ck = load_checkpoint(resolve_checkpoint(tokenizer, "--tokenizer"), expect_kind="tokenizer")
    p = override_preset(ck.preset, list(overrides), f"tokenizer {ck.path}'s preset")
    check_tokenizer_fits(p, ck.preset, f"tokenizer {ck.path}", hint="--set may change the pyramid, not the tokenizer")
    tok = build_tokenizer(ck).to(device).eval()
    R = p.resolution
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, R, R):
        raise UserError(f"images of shape {tuple(images.shape)}: the tokenizer wants (N, 3, {R}, {R})")
    K = p.num_scales
    rhos = radii(p.pyramid.schedule, p.pyramid.rho_max, p.patch_nums, R)
    optics = p.pyramid.model_copy(update={"noise": False})  # the image-space residual: optics only
    sums = [dict(structure=0.0, alias=0.0, alias_error=0.0, image_alias=0.0, image_view=0.0) for _ in range(K)]
    per_image: List[Dict[str, List[np.ndarray]]] = [dict(alias=[], image_alias=[]) for _ in range(K)]
    Va = p.tokenizer.alias_tokens
    s_hits = np.zeros((K, p.tokenizer.vocab_size))
    a_hits = np.zeros((K, Va)) if Va else None
    n = 0
    gen = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float().div(127.5).sub(1.0)
        toks = tok.encode_with_pyramid(x, p.pyramid, R, generator=gen, with_energy=True)
        views = focus_views(x, optics, p.patch_nums, R)  # the paper's Fig. 2: A_k = D_k − L_k
        for k in range(K):
            L_k = views.L[k]
            img_alias = views.A[k].double().square().mean(dim=(1, 2, 3))  # (B,)
            sums[k]["image_alias"] += float(img_alias.sum())
            per_image[k]["image_alias"].append(img_alias.cpu().numpy())
            if "alias" in toks.energy[k]:
                per_image[k]["alias"].append(toks.energy[k]["alias"].double().cpu().numpy())
            sums[k]["image_view"] += float((L_k - L_k.mean(dim=(2, 3), keepdim=True)).double().square()
                                           .mean(dim=(1, 2, 3)).sum())
            for key, v in toks.energy[k].items():
                sums[k][key] += float(v.double().sum())
            s_hits[k] += np.bincount(toks.structure[k].flatten().cpu().numpy(), minlength=s_hits.shape[1])
            if a_hits is not None:
                a_hits[k] += np.bincount(toks.alias[k].flatten().cpu().numpy(), minlength=Va)
        n += len(x)
    scales = []
    for k, pn in enumerate(p.patch_nums):
        s, a, err = (sums[k][key] / n for key in ("structure", "alias", "alias_error"))
        row: Dict[str, Any] = {"scale": k + 1, "tokens": pn, "rho": rhos[k], "structure_ms": s,
                               "image_alias_to_view": (sums[k]["image_alias"] / sums[k]["image_view"]
                                                       if sums[k]["image_view"] > 0 else None)}
        if a_hits is not None:
            row.update(alias_ms=a, alias_to_structure=(a / s if s > 0 else None),
                       carrier_rank_corr=_rank_corr(np.concatenate(per_image[k]["alias"]),
                                                    np.concatenate(per_image[k]["image_alias"])),
                       alias_coded=(1.0 - err / a if a > 0 else None),
                       alias_perplexity=code_usage(a_hits[k])["perplexity"])
        row["structure_perplexity"] = code_usage(s_hits[k])["perplexity"]
        scales.append(row)
    return {"tokenizer": str(ck.path), "preset": p.name, "pyramid": p.pyramid.model_dump(mode="json"),
            "focus_grad": p.tokenizer_train.focus_grad, "images": n, "scales": scales,
            "structure_codes": code_usage(s_hits.sum(0)),
            "alias_codes": code_usage(a_hits.sum(0)) if a_hits is not None else None}


def _rank_corr(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Spearman's rank correlation over images (None when either side is constant, e.g. zero)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (n ≥ 2): a random cycle."""
    if n < 2:
        raise ValueError("a derangement needs at least two items")
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(1)  # order[i] ↦ order[i−1]: one n-cycle, never itself
    return perm


def shuffle_alias(alias_BL: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The control: every image gets the whole alias token sequence of another image of the batch."""
    return alias_BL[derangement(alias_BL.shape[0], generator).to(alias_BL.device)]


def per_scale_ce(logits_BLV: torch.Tensor, target_BL: torch.Tensor, patch_nums: Sequence[int]) -> torch.Tensor:
    """Summed token cross-entropy per scale (K,) float64 (divide by tokens for the mean)."""
    ce = torch.nn.functional.cross_entropy(logits_BLV.float().transpose(1, 2), target_BL, reduction="none")
    return torch.stack([c.double().sum() for c in torch.split(ce, [p * p for p in patch_nums], dim=1)])


def load_teacher(path: PathLike, device: str = "cpu"):
    """The teacher a distillation run saved (<run>/teacher, `fvar distill --save-teacher`), in eval mode."""
    p = Path(path)
    if (p / "teacher").is_dir():
        p = p / "teacher"
    ck = load_checkpoint(p, expect_kind="teacher")
    pr = ck.preset
    t = Teacher(pr.model, pr.teacher, pr.patch_nums, pr.tokenizer.vocab_size, pr.tokenizer.z_channels,
                            pr.tokenizer.alias_tokens)
    load_strict(t, ck.state_dict, f"checkpoint {ck.path}")
    return t.to(device).eval()


@torch.no_grad()
def cross_entropy_report(run: PathLike, shards: PathLike, *, batch_size: int = 100, max_images: Optional[int] = None,
                         seed: int = 0, device: str = "cpu") -> Dict[str, Any]:
    """Per-scale CE (nats per token) of a run's student on token shards; with a saved teacher also
    the teacher's, with the true and with shuffled alias tokens (same batches, same labels)."""
    models = load_models(run, device=device)
    student, tok, p = models.var, models.tokenizer, models.var_ckpt.preset
    teacher = load_teacher(run, device) if (Path(run) / "teacher").is_dir() else None
    data = TokenShards(shards)
    if teacher is not None and not data.has_alias:
        raise UserError(f"token shards {shards} hold no alias tokens: the teacher cannot be evaluated on them")
    n = len(data) if max_images is None else min(max_images, len(data))
    K, sizes = p.num_scales, [q * q for q in p.patch_nums]
    sums = {"student": torch.zeros(K, dtype=torch.float64)}
    if teacher is not None:
        sums["teacher"] = torch.zeros(K, dtype=torch.float64)
        sums["teacher_shuffled"] = torch.zeros(K, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, n, batch_size):
        items = [data[j] for j in range(i, min(i + batch_size, n))]
        structure = torch.stack([it[0] for it in items]).to(device)
        label = torch.tensor([int(it[2]) for it in items], device=device)
        x_in = tok.quantize.idx_to_var_input(list(torch.split(structure, sizes, dim=1)))
        sums["student"] += per_scale_ce(student(label, x_in), structure, p.patch_nums).cpu()
        if teacher is not None:
            alias = torch.stack([it[1] for it in items]).to(device)
            sums["teacher"] += per_scale_ce(teacher(label, x_in, alias), structure, p.patch_nums).cpu()
            # A lone last image has no other image to borrow from: it counts unshuffled.
            shuffled = shuffle_alias(alias, gen) if len(items) > 1 else alias
            sums["teacher_shuffled"] += per_scale_ce(teacher(label, x_in, shuffled), structure, p.patch_nums).cpu()
    tokens = torch.tensor(sizes, dtype=torch.float64) * n
    out: Dict[str, Any] = {"run": str(Path(run)), "shards": str(Path(shards)), "images": n,
                           "patch_nums": list(p.patch_nums)}
    for name, s in sums.items():
        out[name] = {"per_scale": (s / tokens).tolist(), "mean": float(s.sum() / tokens.sum())}
    return out
