"""Codebook health while a tokenizer trains: per-scale usage in the log window, restarts of codes
no input chose since the last restart (VQGAN-style dead-code re-seeding).

Restarted codes are re-seeded from random rows of what that codebook codes in the current batch:
the structure residuals area_down_k(z_k − f̂_{k−1}) for the structure codebook, the alias
differences area_down_k(E(x) − z_k) of the blurred scales for the alias codebook. Under DDP the
hit counts are summed over ranks and every rank keeps rank 0's re-seeded codebook.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import distributed as tdist

from fvar_core.models.quantizer import MultiScaleQuantizer, VQOutput
from fvar_core.models.tokenizer import Tokenizer


def restart_dead_codes(weight: torch.Tensor, hits: torch.Tensor, pool: torch.Tensor) -> int:
    """Re-seed the codes of `weight` (V, C) with zero `hits` (V,) from random rows of pool (N, C)
    plus a little noise; returns how many were re-seeded."""
    dist = tdist.is_available() and tdist.is_initialized()
    if dist:
        hits = hits.clone()
        tdist.all_reduce(hits)
    dead = (hits == 0).nonzero().flatten()
    if len(dead) and len(pool):
        pick = torch.randint(len(pool), (len(dead),), device=pool.device)
        new = pool[pick] + 1e-3 * pool.std() * torch.randn(len(dead), pool.shape[1], device=pool.device)
        weight.data[dead] = new.to(weight.dtype)
    if dist:
        tdist.broadcast(weight.data, 0)  # every rank keeps rank 0's codebook
    return int(len(dead))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B·h·w, C): one row per quantizer input."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class CodebookMonitor:
    """Hit counts of both codebooks: per scale over the log window, in total since the last restart."""

    def __init__(self, num_scales: int, vocab_size: int, alias_vocab_size: int):
        self.window = torch.zeros(num_scales, vocab_size)      # (K, V) hits in the log window
        self.window_alias = torch.zeros(num_scales, alias_vocab_size) if alias_vocab_size else None
        self.dead = torch.zeros(vocab_size)                    # (V,) hits since the last restart
        self.dead_alias = torch.zeros(alias_vocab_size) if alias_vocab_size else None
        self.restarted = {"structure": 0, "alias": 0}

    def to(self, device: torch.device) -> "CodebookMonitor":
        for name in ("window", "window_alias", "dead", "dead_alias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    @torch.no_grad()
    def record(self, vq: VQOutput) -> None:
        """Count the codes a step chose (vq.hits_SV (K, V); alias indices per scale)."""
        self.window += vq.hits_SV
        self.dead += vq.hits_SV.sum(0)
        if vq.alias_idx is not None and self.window_alias is not None:
            Va = self.window_alias.shape[1]
            for k, a in enumerate(vq.alias_idx):
                h = a.flatten().bincount(minlength=Va).float()
                self.window_alias[k] += h
                self.dead_alias += h

    @torch.no_grad()
    def restart(self, tok: Tokenizer, img: torch.Tensor, focus: Sequence[torch.Tensor]) -> None:
        """Re-seed every code unused since the last restart from this batch's quantizer inputs
        (img (B, 3, R, R) and its focus views, `focus[k] is img` where scale k is sharp)."""
        q: MultiScaleQuantizer = tok.quantize
        f, zs = tok.encode_views(img, focus)
        f, zs = f.float(), [z.float() for z in zs]
        toks = q.encode_focus(f, zs)
        pool = torch.cat([_rows(q.down(zs[k] - (toks.fhat[k - 1] if k else 0), k)) for k in range(q.num_scales)])
        if q.embedding.weight.requires_grad:
            self.restarted["structure"] += restart_dead_codes(q.embedding.weight, self.dead, pool)
        if self.dead_alias is not None and q.alias_embedding is not None:
            diffs = [_rows(q.down(f - zs[k], k)) for k in range(q.num_scales) if focus[k] is not img]
            if diffs:
                self.restarted["alias"] += restart_dead_codes(q.alias_embedding.weight, self.dead_alias,
                                                              torch.cat(diffs))
        self.dead.zero_()
        if self.dead_alias is not None:
            self.dead_alias.zero_()

    def log_metrics(self) -> Dict[str, Any]:
        """Per-scale usage and code counts of the window, restarts since the last log; resets both."""
        out: Dict[str, Any] = {
            "usage_structure": [round(float(x), 4) for x in (self.window > 0).float().mean(1)],
            "codes_structure": [int(x) for x in (self.window > 0).sum(1)],
            "dead_restarted_structure": self.restarted["structure"]}
        if self.window_alias is not None:
            out["usage_alias"] = [round(float(x), 4) for x in (self.window_alias > 0).float().mean(1)]
            out["codes_alias"] = [int(x) for x in (self.window_alias > 0).sum(1)]
            out["dead_restarted_alias"] = self.restarted["alias"]
            self.window_alias.zero_()
        self.window.zero_()
        self.restarted = {"structure": 0, "alias": 0}
        return out

    def state(self) -> Dict[str, Optional[torch.Tensor]]:
        """What resume needs: the hits since the last restart (the window restarts with the log)."""
        return {"dead": self.dead.cpu(), "dead_alias": self.dead_alias.cpu() if self.dead_alias is not None else None}

    def load_state(self, d: Mapping[str, Any]) -> None:
        self.dead = d["dead"].to(self.dead.device)
        if self.dead_alias is not None and d.get("dead_alias") is not None:
            self.dead_alias = d["dead_alias"].to(self.dead_alias.device)
