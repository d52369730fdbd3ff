"""Training-free sampling speed-ups for any VAR checkpoint (docs/sampling-speed.md).

Each one is off by default, is a field of `SampleConfig`, and changes tokens only from the scale it
starts at (the earlier scales run exactly as the default sampler does):

- guidance up to a scale (`cfg_scales`): after the first N scales the null-class half of the
  batch and its KV cache are dropped, halving the work of every later scale;
- token pruning (`prune`, FastVAR's idea): at the chosen scales only the tokens whose input
  differs most from the scale's mean input (its "high-frequency" tokens) go through the
  transformer; the others take the previous scale's last hidden states, up-sampled, so the head
  still gives every position logits and every position still samples a token;
- draft and refine (`refine_from`, CoDe's idea): one model samples the first scales, another the
  rest; the refiner reads the drafted scales once to fill its own KV cache;
- a KV budget (`kv_budget`, AMS-KV's idea): each scale attends only to the first scales and the
  most recent ones, so the cache holds fewer tokens (its size is fixed up front).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fvar_core.config import SampleConfig
from fvar_core.errors import UserError


def check_speedups(s: SampleConfig, var, refiner=None) -> None:
    """One-line UserError for a setting that does not fit the model's scales, or a refiner that
    does not share the draft model's token space (the caller checks that both were trained on the
    same tokenizer: `sample.loading`)."""
    pns, K = list(var.patch_nums), len(var.patch_nums)
    bad = sorted(pn for pn in s.prune if pn not in pns[1:])
    if bad:
        raise UserError(f"prune: scale(s) {bad} are not patch numbers after the first of this model ({pns[1:]})")
    if s.refine_from and refiner is None:
        raise UserError(f"refine-from {s.refine_from} needs a refiner model (--refiner)")
    if refiner is None:
        return
    if not 1 <= s.refine_from <= K - 1:
        raise UserError(f"refine-from must be a scale index in 1..{K - 1} when a refiner is given (got {s.refine_from})")
    for what in ("patch_nums", "vocab_size", "z_channels", "num_classes"):
        a, b = getattr(var, what), getattr(refiner, what)
        if a != b:
            raise UserError(f"the refiner's {what.replace('_', ' ')} {b} differ from the draft model's {a}: "
                            "draft and refine need the same tokenizer and scales")


def kv_keeps(first: int, recent: int, si: int) -> Callable[[int], bool]:
    """Which earlier scales s scale si attends to under a KV budget (first, recent)."""
    return lambda s: s < first or s >= si - recent


def kv_capacity(patch_nums: Sequence[int], budget: Optional[Tuple[int, int]]) -> int:
    """Tokens per row the KV cache must hold: all L, or under a budget the largest set any scale
    attends to (its kept scales plus itself)."""
    sizes = [p * p for p in patch_nums]
    if budget is None:
        return sum(sizes)
    keep = [kv_keeps(*budget, si) for si in range(len(sizes))]
    return max(sizes[si] + sum(n for s, n in enumerate(sizes[:si]) if keep[si](s)) for si in range(len(sizes)))


def kept_tokens(x_next: torch.Tensor, ratio: float) -> torch.Tensor:
    """The tokens pruning keeps at a scale: x_next (B, l, Cv) the scale's input (f̂ down-sampled) →
    indices (B, n) in ascending order, n = max(1, round(l·(1 − ratio))): the tokens farthest from
    the scale's mean input (flat regions change least from one scale to the next)."""
    B, l, _ = x_next.shape
    n = max(1, round(l * (1.0 - ratio)))
    score = (x_next - x_next.mean(dim=1, keepdim=True)).float().norm(dim=-1)  # (B, l)
    return score.topk(n, dim=1).indices.sort(dim=1).values


def fill_pruned(h_kept: torch.Tensor, keep: torch.Tensor, h_prev: torch.Tensor, pn: int) -> torch.Tensor:
    """Hidden states of a pruned scale: h_kept (R, n, C) at positions keep (R, n); every other
    position takes the previous scale's hidden map h_prev (R, p², C), bilinearly up-sampled to
    pn × pn. → (R, pn², C)."""
    R, lp, C = h_prev.shape
    p = math.isqrt(lp)
    up = F.interpolate(h_prev.transpose(1, 2).reshape(R, C, p, p).float(), size=(pn, pn), mode="bilinear",
                       align_corners=False)
    full = up.flatten(2).transpose(1, 2).to(h_kept.dtype).contiguous()  # (R, pn², C)
    return full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, C), h_kept)


def parse_prune(text: str) -> dict:
    """'13:0.5,16:0.7' → {13: 0.5, 16: 0.7} (patch number: share of tokens pruned); one-line error."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        pn, sep, ratio = part.partition(":")
        try:
            out[int(pn)] = float(ratio)
        except ValueError:
            raise UserError(f"--prune: {part!r} is not PATCH:RATIO (e.g. 13:0.5,16:0.7)") from None
        if not sep:
            raise UserError(f"--prune: {part!r} is not PATCH:RATIO (e.g. 13:0.5,16:0.7)")
    return out


def speedup_overrides(cfg_scales: Optional[int] = None, prune: Optional[str] = None, refine_from: Optional[int] = None,
                      kv_budget: Optional[str] = None, decode_precision: Optional[str] = None) -> dict:
    """The speed-up options as the CLI and the studio take them (prune '8:0.5', kv_budget '1,1';
    None or empty = not given) → `settings_from` overrides."""
    return {"cfg_scales": cfg_scales, "prune": parse_prune(prune) if prune else None, "refine_from": refine_from,
            "kv_budget": parse_kv_budget(kv_budget) if kv_budget else None, "decode_precision": decode_precision}


def parse_kv_budget(text: str) -> Tuple[int, int]:
    """'1,2' → (1, 2): the first scales and the most recent ones each scale attends to."""
    try:
        first, recent = (int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--kv-budget: {text!r} is not FIRST,RECENT (e.g. 1,2)") from None
    return first, recent
