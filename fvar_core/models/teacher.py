"""High-frequency residual teacher (paper §3.5, docs/design.md §6): VAR + alias tokens via AG-XAttn.

The teacher is the student's architecture (its own copy of the weights, `self.net`, a `VAR`) plus
  * an alias-token embedding E_a: alias index -> C, with its own level and position embedding, so
    an alias token knows its scale and place (alias tokens use the structure tokens' layout:
    alias_idx_BL (B, L), scale k at positions begin_ends[k]);
  * Alias-Gate Cross-Attention in the last M blocks, between self-attention and the FFN:
        x <- x + tanh(g) ⊙ Proj(CrossAttn(Q = LN(x), K = V = LN_a(E_a(a))))          (Eq. 9-10)
    Queries of scale k see alias tokens of scales <= k (`alias_visibility`: causal; or == k, or all).
    Alias tokens are inputs only: nothing predicts them.

Gate choice (docs/design.md §6). Eq. 10 gates with α ∈ [0, 1]^d, read literally a sigmoid σ(g); σ never
reaches 0, so a σ gate cannot start closed and the teacher would not start as the student. We use tanh(g) with g = 0 per channel (Flamingo's gated
cross-attention): exactly closed at init — copied weights give bit-identical logits — and
d tanh(g)/dg = 1 at 0, so the gate opens on the first step (the cross-attention weights receive
gradient once the gate is non-zero). Its range (-1, 1) instead of Eq. 10's [0, 1] loses nothing:
the sign is absorbed by the learned output projection.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from fvar_core.config import ModelConfig, TeacherConfig
from fvar_core.errors import UserError
from fvar_core.models.transformer import VAR, attend, run_block, scale_block_mask, visibility


class AliasGateCrossAttention(nn.Module):
    """AG-XAttn: x (B, L, C) attends to alias memory a (B, La, C) through a per-channel gate."""

    def __init__(self, width: int, num_heads: int, norm_eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.ln_q = nn.LayerNorm(width, eps=norm_eps)
        self.ln_a = nn.LayerNorm(width, eps=norm_eps)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.zeros(width))  # tanh(0) = 0: closed at init

    def forward(self, x: torch.Tensor, a: torch.Tensor, mask) -> torch.Tensor:
        B, L, C = x.shape
        La = a.shape[1]
        q = self.q(self.ln_q(x)).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, c)
        k, v = self.kv(self.ln_a(a)).view(B, La, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, mask, self.head_dim ** -0.5).transpose(1, 2).reshape(B, L, C)
        return x + torch.tanh(self.gate) * self.proj(out)


class Teacher(nn.Module):
    """Student-shaped VAR + alias embedding + AG-XAttn in the last `xattn_blocks` blocks."""

    def __init__(self, model_cfg: ModelConfig, teacher_cfg: TeacherConfig, patch_nums: Sequence[int],
                 vocab_size: int, z_channels: int, alias_vocab_size: int, attn_backend: str = "auto"):
        super().__init__()
        if alias_vocab_size < 1:
            raise UserError("the teacher needs alias tokens: tokenizer.alias_vocab_size must be > 0")
        if not 1 <= teacher_cfg.xattn_blocks <= model_cfg.depth:
            raise UserError(f"teacher.xattn_blocks ({teacher_cfg.xattn_blocks}) must lie in [1, model.depth "
                            f"({model_cfg.depth})]")
        self.teacher_cfg = teacher_cfg
        self.net = VAR(model_cfg, patch_nums, vocab_size, z_channels, attn_backend)
        C, L, K = model_cfg.width, self.net.seq_len, len(self.net.patch_nums)
        self.alias_vocab_size = alias_vocab_size
        self.alias_embed = nn.Embedding(alias_vocab_size, C)
        self.alias_lvl_embed = nn.Embedding(K, C)
        self.alias_pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.first_xattn = model_cfg.depth - teacher_cfg.xattn_blocks  # blocks >= this get AG-XAttn
        self.xattn = nn.ModuleList([AliasGateCrossAttention(C, model_cfg.num_heads, model_cfg.norm_eps)
                                    for _ in range(teacher_cfg.xattn_blocks)])
        lvl = self.net.lvl_1L[0]
        rule = teacher_cfg.alias_visibility
        cross = None if rule == "all" else visibility(lvl, lvl, rule)[None, None]  # (1, 1, L, L) bool
        self.register_buffer("alias_mask", cross, persistent=False)
        self._block_masks: dict = {}
        self.init_alias_weights()

    @classmethod
    def from_student(cls, student: VAR, teacher_cfg: TeacherConfig, alias_vocab_size: int) -> "Teacher":
        """A teacher whose VAR weights are a copy of the student's (closed gates: same logits)."""
        teacher = cls(student.cfg, teacher_cfg, student.patch_nums, student.vocab_size, student.z_channels,
                      alias_vocab_size, student.attn_backend)
        teacher.to(student.pos_1LC.device)
        teacher.net.load_state_dict(student.state_dict(), strict=True)
        return teacher

    @torch.no_grad()
    def init_alias_weights(self) -> None:
        """Teacher-only parameters (the VAR part is initialised by VAR.init_weights)."""
        C = self.net.width
        std = self.net.cfg.init_std if self.net.cfg.init_std is not None else math.sqrt(1.0 / (3 * C))
        nn.init.trunc_normal_(self.alias_embed.weight, std=std)
        nn.init.trunc_normal_(self.alias_lvl_embed.weight, std=std)
        nn.init.trunc_normal_(self.alias_pos_1LC, std=std)
        for xa in self.xattn:
            for lin in (xa.q, xa.kv, xa.proj):
                nn.init.trunc_normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
            for ln in (xa.ln_q, xa.ln_a):
                nn.init.ones_(ln.weight)
                nn.init.zeros_(ln.bias)
            nn.init.zeros_(xa.gate)

    def embed_alias(self, alias_idx_BL: torch.Tensor) -> torch.Tensor:
        """(B, L) alias indices -> (B, L, C) alias memory with level and position."""
        B = alias_idx_BL.shape[0]
        return (self.alias_embed(alias_idx_BL) + self.alias_lvl_embed(self.net.lvl_1L.expand(B, -1))
                + self.alias_pos_1LC)

    def _cross_mask(self, self_mask):
        """Same backend as the self-attention: bool (1,1,L,L) for SDPA, a BlockMask for flex."""
        if isinstance(self_mask, torch.Tensor):
            return self.alias_mask
        key = (self.net.seq_len, str(self_mask.kv_indices.device))
        if key not in self._block_masks:
            lvl = self.net.lvl_1L[0].to(self_mask.kv_indices.device)
            self._block_masks[key] = scale_block_mask(lvl, lvl, self.teacher_cfg.alias_visibility)
        return self._block_masks[key]

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, alias_idx_BL: torch.Tensor, *,
                return_features: int = 0, generator: Optional[torch.Generator] = None, label_dropout: bool = True,
                head: bool = True):
        """label_B (B,), x_BLCv_wo_first_l (B, L-first_l, Cv), alias_idx_BL (B, L) -> logits (B, L, V),
        or (logits, hidden states after each of the last `return_features` blocks), as VAR.forward (and
        head=False: the head's input instead of the logits).
        For online distillation drop labels once (student.drop_labels) and pass label_dropout=False
        to both networks so they see the same null labels."""
        net = self.net
        if alias_idx_BL.shape != (x_BLCv_wo_first_l.shape[0], net.seq_len):
            raise ValueError(f"alias_idx_BL must be (B, {net.seq_len}), got {tuple(alias_idx_BL.shape)}")
        if self.training and label_dropout:
            label_B = net.drop_labels(label_B, generator)
        x, cond_BD = net.embed(label_B, x_BLCv_wo_first_l)
        alias = self.embed_alias(alias_idx_BL)  # (B, L, C)
        cond = net.shared_ada_lin(cond_BD)
        mask = net.attention_mask(x.device)
        cross_mask = self._cross_mask(mask)
        feats = []

        def layer(i: int, x: torch.Tensor) -> torch.Tensor:
            if i < self.first_xattn:
                return net.blocks[i](x, cond, mask)
            xattn = self.xattn[i - self.first_xattn]
            return net.blocks[i](x, cond, mask, None, lambda h: xattn(h, alias, cross_mask))

        for i in range(net.depth):
            x = run_block(net, layer, i, x)
            if i >= net.depth - return_features:
                feats.append(x)
        return net.finish(x, cond_BD, feats, return_features, head)
