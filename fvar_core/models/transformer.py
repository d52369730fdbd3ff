"""The VAR transformer: FVAR's deployment (student) network (docs/design.md §6, docs/var-compat.md §2).

State-dict keys, shapes, dtypes and buffers are those of the official VAR release, and so are the
outputs (tests/data/var-reference): an official `var_d*.pth` loads with `load_official_state_dict`
and a trained student exports with `official_state_dict`. What differs from the official code is
how, never what: label dropout only in training mode with a caller-chosen RNG, FlexAttention with a
block-sparse mask for training on CUDA, a preallocated KV cache for inference, no global
monkeypatching, initialisation in one visible place (`VAR.init_weights`).

Sequence layout (docs/var-compat.md §2.2): K scales with patch numbers pn_k, L = Σ pn_k² tokens, scale k
occupying positions begin_ends[k]. Position 0.. first_l-1 carry the class token (start of sequence);
the tokens of scale k ≥ 1 carry word_embed of the accumulated f̂ of scales < k, area-downsampled to
pn_k (`x_BLCv_wo_first_l`). The tokens of scale k predict the indices of scale k. Attention is full
inside a scale and causal across scales.

Names: B batch, L tokens, C width, H heads, c head dim, V vocabulary, Cv VQ latent channels (32),
D condition width (= C).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fvar_core.config import ModelConfig
from fvar_core.checkpoints import key_diff, list_keys
from fvar_core.errors import UserError

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    HAS_FLEX = True
except ImportError:  # pragma: no cover - older torch
    BlockMask = create_block_mask = flex_attention = None
    HAS_FLEX = False

# keys whose value the model computes from its configuration (never learned)
DERIVED_KEYS_SUFFIXES = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")


# ------------------------------------------------------------------------------------------------
# Scale-block masks and the attention kernel dispatch
# ------------------------------------------------------------------------------------------------

def scale_ids(patch_nums: Sequence[int]) -> torch.Tensor:
    """(L,) int64: the scale index of every token position."""
    return torch.cat([torch.full((pn * pn,), k, dtype=torch.long) for k, pn in enumerate(patch_nums)])


def visibility(q_scale: torch.Tensor, k_scale: torch.Tensor, rule: str = "causal") -> torch.Tensor:
    """(Lq, Lk) bool, True = query may attend to key. causal: scale(q) >= scale(k) (VAR's
    block-causal mask); same: scale(q) == scale(k); all: everything."""
    q, k = q_scale[:, None], k_scale[None, :]
    if rule == "causal":
        return q >= k
    if rule == "same":
        return q == k
    if rule == "all":
        return torch.ones(q_scale.numel(), k_scale.numel(), dtype=torch.bool, device=q_scale.device)
    raise ValueError(f"unknown visibility rule {rule!r}")


def scale_block_mask(q_scale: torch.Tensor, k_scale: torch.Tensor, rule: str = "causal") -> "BlockMask":
    """FlexAttention BlockMask of `visibility`; fully masked 128×128 tiles are skipped by the kernel
    (38% of VAR's L×L pairs at 256px), fully visible ones need no mask evaluation."""
    qs, ks = q_scale, k_scale

    if rule == "causal":
        def mask_mod(b, h, qi, ki):
            return qs[qi] >= ks[ki]
    elif rule == "same":
        def mask_mod(b, h, qi, ki):
            return qs[qi] == ks[ki]
    elif rule == "all":
        def mask_mod(b, h, qi, ki):
            return qi >= 0
    else:
        raise ValueError(f"unknown visibility rule {rule!r}")
    return create_block_mask(mask_mod, None, None, qs.numel(), ks.numel(), device=qs.device)


_FLEX_COMPILED = None


def _flex_kernel(q: torch.Tensor):
    """flex_attention is only fused when compiled; eager (CPU tests) it materialises the scores but
    computes the same thing. Inside a whole-model torch.compile the plain function is traced."""
    global _FLEX_COMPILED
    if not q.is_cuda or torch.compiler.is_compiling():
        return flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head attention: q (B,H,Lq,c), k/v (B,H,Lk,c) -> (B,H,Lq,c).

    mask: None (every key visible: KV-cached inference), a FlexAttention `BlockMask`, or a tensor
    broadcastable to (B,H,Lq,Lk) for SDPA — additive float (VAR's `attn_bias_for_masking`) or bool."""
    if HAS_FLEX and isinstance(mask, BlockMask):
        return _flex_kernel(q)(q, k, v, block_mask=mask, scale=scale)
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # under autocast q is bf16/fp16; SDPA wants the same dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# ------------------------------------------------------------------------------------------------
# KV cache for scale-by-scale inference
# ------------------------------------------------------------------------------------------------

class KVCache:
    """Keys/values of every block, preallocated (no torch.cat growth, static storage). `length`
    tokens are filled; `VAR.forward_step` appends one scale and advances it; `scales` lists the
    scales stored, in order, with their token counts. Keys are stored l2-normalised, as the official
    cache does. `capacity` defaults to all L tokens; a smaller one holds only the scales a KV budget
    keeps (`keep_scales` drops the others and moves the rest down)."""

    def __init__(self, depth: int, batch: int, num_heads: int, seq_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (depth, batch, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (depth, B, H, capacity, c)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.scales: List[tuple] = []  # (scale index, tokens stored)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        self.length = 0
        self.scales = []

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)

    def keep_rows(self, n: int) -> None:
        """Keep the first n batch rows (the conditional half, once guidance stops)."""
        self.k, self.v = self.k[:, :n], self.v[:, :n]

    def keep_scales(self, keep: Callable[[int], bool]) -> None:
        """Drop every stored scale s with keep(s) False; the kept ones move down, in order."""
        if all(keep(s) for s, _ in self.scales):
            return
        pos, start, kept = [], 0, []
        for s, n in self.scales:
            if keep(s):
                pos.extend(range(start, start + n))
                kept.append((s, n))
            start += n
        idx = torch.tensor(pos, device=self.k.device, dtype=torch.long)
        n = len(pos)
        self.k[:, :, :, :n] = self.k.index_select(3, idx)
        self.v[:, :, :, :n] = self.v.index_select(3, idx)
        self.length, self.scales = n, kept


class _LayerCache:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k, v (B,H,l,c) after the filled part; return all keys/values so far."""
        s, e = self.cache.length, self.cache.length + k.shape[2]
        if e > self.cache.capacity:
            raise RuntimeError(f"KV cache holds {self.cache.capacity} tokens, this scale needs {e}")
        self.cache.k[self.i, :, :, s:e] = k
        self.cache.v[self.i, :, :, s:e] = v
        return self.cache.k[self.i, :, :, :e], self.cache.v[self.i, :, :, :e]


# ------------------------------------------------------------------------------------------------
# Building blocks (official module names = official state-dict keys)
# ------------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        return x * x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class SelfAttention(nn.Module):
    """VAR's attention (docs/var-compat.md §2.4): fused qkv without bias + (q_bias, 0, v_bias); with
    attn_l2_norm, q and k are l2-normalised and q is scaled by a learned per-head temperature
    exp(min(scale_mul_1H11, ln 100)) — softmax scale 1; without it the scale is 0.25/sqrt(c)."""

    def __init__(self, width: int, num_heads: int, attn_l2_norm: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.empty(1, num_heads, 1, 1))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.q_bias = nn.Parameter(torch.empty(width))
        self.v_bias = nn.Parameter(torch.empty(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # persistent: it is in the checkpoints
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, mask, cache: Optional[_LayerCache] = None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, c)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()  # (1, H, 1, 1)
            # under autocast the norm runs in fp32 and would leave q, k fp32 beside a bf16 v: back to
            # v's dtype, which attention casts to anyway — and the KV cache is kept in (no per-block
            # upcast copy of the whole prefix). A no-op in fp32.
            q = F.normalize(q, dim=-1).mul(scale_mul.to(q.dtype)).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        if cache is not None:  # inference: attend to all cached scales plus this one, no mask
            k, v = cache.update(k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # no-op when the cache has the compute dtype
        dropout_p = self.attn_drop if self.training else 0.0
        out = attend(q, k, v, mask, self.scale, dropout_p)  # (B, H, L, c)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SharedAdaLin(nn.Linear):
    """The shared-AdaLN linear (d36-s): cond (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


class AdaLNSelfAttn(nn.Module):
    """Transformer block with adaptive LayerNorm from the class condition (docs/var-compat.md §2.4):
        γ1, γ2, s1, s2, b1, b2 = AdaLN(cond)        (this order!)
        x = x + drop_path(attn(LN(x)·(1+s1) + b1) · γ1)
        x = x + drop_path(ffn (LN(x)·(1+s2) + b2) · γ2)
    With shared_aln the six vectors are ada_gss + shared_ada_lin(cond), computed once by VAR."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, drop: float, attn_drop: float,
                 drop_path: float, norm_eps: float, shared_aln: bool, attn_l2_norm: bool):
        super().__init__()
        self.width, self.shared_aln = width, shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.empty(1, 1, 6, width))
        self.attn = SelfAttention(width, num_heads, attn_l2_norm, attn_drop, drop)
        self.ffn = FFN(width, round(width * mlp_ratio), drop)
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        if not shared_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(width, 6 * width))
        self.drop_path = DropPath(drop_path)

    def modulation(self, cond: torch.Tensor):
        """cond (B, D), or (B, 1, 6, C) with shared_aln -> six (B, 1, C): γ1, γ2, s1, s2, b1, b2."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)
        return self.ada_lin(cond).view(-1, 1, 6, self.width).unbind(2)

    def attn_branch(self, x: torch.Tensor, mods, mask, cache: Optional[_LayerCache] = None) -> torch.Tensor:
        g1, _, s1, _, b1, _ = mods
        return x + self.drop_path(self.attn(self.ln_wo_grad(x) * (s1 + 1) + b1, mask, cache) * g1)

    def ffn_branch(self, x: torch.Tensor, mods) -> torch.Tensor:
        _, g2, _, s2, _, b2 = mods
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask, cache: Optional[_LayerCache] = None,
                between: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C). `between` runs on x between the two branches (the teacher's
        AG-XAttn): inside this call, so a sharded block gathers its weights once for all of it."""
        mods = self.modulation(cond)
        x = self.attn_branch(x, mods, mask, cache)
        return self.ffn_branch(x if between is None else between(x), mods)


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN before the head: LN(x)·(1+scale) + shift, scale/shift from cond."""

    def __init__(self, width: int, norm_eps: float):
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


# ------------------------------------------------------------------------------------------------
# VAR
# ------------------------------------------------------------------------------------------------

_aten = torch.ops.aten
# Ops whose outputs "pointwise" checkpointing keeps: matmuls and attention (the FLOPs). Everything
# else in a block — norms, AdaLN modulation, q/k normalisation, GELU, gates — is elementwise and
# cheap to recompute, yet its outputs are most of what eager autograd would keep.
KEEP_OPS = frozenset(op for op in (
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default))


def _keep_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in KEEP_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def run_block(owner: nn.Module, fn, *args):
    """fn(*args), under activation checkpointing when training with owner.activation_checkpointing:
    'full' recomputes the block in the backward pass, 'pointwise' only its elementwise ops (the
    matmul and attention outputs are kept, so no FLOPs are repeated)."""
    mode = getattr(owner, "activation_checkpointing", "off")
    if not (owner.training and mode not in ("off", False, None) and torch.is_grad_enabled()):
        return fn(*args)
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if mode == "pointwise":
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=lambda: create_selective_checkpoint_contexts(_keep_matmuls))
    return checkpoint(fn, *args, use_reentrant=False)


class VAR(nn.Module):
    """Class-conditional next-scale transformer, state-dict compatible with the official VAR.

    attn_backend: 'auto' (FlexAttention with a block-sparse mask on CUDA, SDPA with the (1,1,L,L)
    additive mask elsewhere), 'flex' or 'sdpa'. A runtime choice, not a model hyperparameter.
    """

    def __init__(self, cfg: ModelConfig, patch_nums: Sequence[int], vocab_size: int = 4096,
                 z_channels: int = 32, attn_backend: str = "auto"):
        super().__init__()
        if attn_backend not in ("auto", "flex", "sdpa"):
            raise ValueError(f"attn_backend must be auto, flex or sdpa, got {attn_backend!r}")
        if attn_backend == "flex" and not HAS_FLEX:
            raise UserError("attn_backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        self.cfg = cfg
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.vocab_size, self.z_channels = vocab_size, z_channels
        self.depth, self.width, self.num_heads = cfg.depth, cfg.width, cfg.num_heads
        self.num_classes, self.cond_drop = cfg.num_classes, cfg.cond_drop
        self.attn_backend = attn_backend
        C = cfg.width
        self.first_l = self.patch_nums[0] ** 2
        self.seq_len = L = sum(p * p for p in self.patch_nums)
        ends = list(itertools.accumulate(p * p for p in self.patch_nums))
        self.begin_ends = [(e - p * p, e) for e, p in zip(ends, self.patch_nums)]  # scale k: [bg, ed)

        # official registration order = official state-dict order: params, buffers, children
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))  # (1, first_l, C)
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))  # (1, L, C)
        lvl = scale_ids(self.patch_nums)
        self.register_buffer("lvl_1L", lvl.view(1, L).contiguous())  # (1, L) int64
        attn_bias = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", attn_bias.reshape(1, 1, L, L).contiguous())
        self.word_embed = nn.Linear(z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # index num_classes = null class (CFG)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C))
                               if cfg.shared_aln else nn.Identity())
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # stochastic depth per block
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, cfg.num_heads, cfg.mlp_ratio, cfg.drop_rate, cfg.attn_drop, dpr[i],
                          cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm)
            for i in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self._block_masks: dict = {}  # (L, device) -> BlockMask; not state
        # Recompute in the backward pass (training only): "off", "pointwise" or "full" (`run_block`).
        self.activation_checkpointing = "off"
        self.init_weights()

    # --- initialisation: VAR's init_weights (docs/var-compat.md §2.6), the only place weights are set ---
    @torch.no_grad()
    def init_weights(self) -> None:
        cfg, C, depth = self.cfg, self.width, self.depth
        std = cfg.init_std if cfg.init_std is not None else math.sqrt(1.0 / (3 * C))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.head.weight.mul_(cfg.init_head)
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        for block in self.blocks:
            attn = block.attn
            if attn.attn_l2_norm:
                attn.scale_mul_1H11.fill_(math.log(4.0))
            nn.init.zeros_(attn.q_bias)
            nn.init.zeros_(attn.v_bias)
            # residual branches scaled down with depth (GPT-2 style)
            attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            # AdaLN rows: [γ1, γ2 | s1, s2, b1, b2]; tiny γ makes every block ~identity at init
            if block.shared_aln:
                nn.init.normal_(block.ada_gss, std=C ** -0.5)
                block.ada_gss[:, :, 2:].mul_(cfg.init_adaln)
                block.ada_gss[:, :, :2].mul_(cfg.init_adaln_gamma)
            else:
                w = block.ada_lin[-1].weight  # (6C, C)
                w[2 * C:].mul_(cfg.init_adaln)
                w[:2 * C].mul_(cfg.init_adaln_gamma)

    # --- pieces shared with the teacher ---
    def drop_labels(self, label_B: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Label dropout for classifier-free guidance: each label -> null class with prob cond_drop.
        The caller decides when (VAR.forward: training mode only)."""
        if self.cond_drop <= 0.0:
            return label_B
        drop = torch.rand(label_B.shape, device=label_B.device, generator=generator) < self.cond_drop
        return torch.where(drop, torch.full_like(label_B, self.num_classes), label_B)

    def embed(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor):
        """Teacher-forcing input sequence, in fp32 even under autocast (as the official).
        label_B (B,), x (B, L-first_l, Cv) -> x_BLC (B, L, C), cond_BD (B, C)."""
        B = x_BLCv_wo_first_l.shape[0]
        with torch.autocast(x_BLCv_wo_first_l.device.type, enabled=False):
            cond_BD = self.class_emb(label_B)  # (B, C): also the AdaLN condition
            sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        return x_BLC, cond_BD

    def attention_mask(self, device: torch.device, backend: Optional[str] = None):
        """Block-causal mask of the full sequence for the chosen backend: a BlockMask (flex, built
        once per (L, device)) or the (1,1,L,L) additive buffer (sdpa) — never (B, H, L, L)."""
        backend = backend or self.attn_backend
        if backend == "auto":
            dropout = self.training and self.cfg.attn_drop > 0  # FlexAttention has no dropout
            backend = "flex" if HAS_FLEX and device.type == "cuda" and not dropout else "sdpa"
        if backend == "sdpa":
            return self.attn_bias_for_masking
        if device.type == "cpu" and torch.is_grad_enabled() and self.training:
            raise UserError("FlexAttention has no backward pass on CPU in this torch: use attn_backend 'sdpa' "
                            "(or 'auto') for CPU training")
        key = (self.seq_len, str(device))
        if key not in self._block_masks:
            lvl = self.lvl_1L[0].to(device)
            self._block_masks[key] = scale_block_mask(lvl, lvl, "causal")
        return self._block_masks[key]

    def head_input(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, L, C) last hidden states -> (B, L, C) float32, what `head` maps to logits."""
        return self.head_nm(h_BLC.float(), cond_BD).float()

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, L, V) float32 logits."""
        return self.head(self.head_input(h_BLC, cond_BD)).float()

    def finish(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor, feats: list, return_features: int, head: bool):
        """The forward's return value: logits (or, head=False, the head's input) [, features]."""
        out = self.get_logits(h_BLC, cond_BD) if head else self.head_input(h_BLC, cond_BD)
        return (out, feats) if return_features else out

    # --- training / teacher forcing ---
    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, *,
                return_features: int = 0, generator: Optional[torch.Generator] = None,
                label_dropout: bool = True, head: bool = True):
        """label_B (B,) int64; x_BLCv_wo_first_l (B, L-first_l, Cv) -> logits (B, L, V) float32,
        or (logits, [hidden states (B, L, C) after each of the last `return_features` blocks]).
        head=False returns the head's input (B, L, C) float32 in place of the logits (the training
        losses apply the head themselves, chunk by chunk: `train.head_loss`).

        Label dropout (cond_drop) only in training mode and only if label_dropout (pass False when
        the caller already dropped labels, e.g. once for teacher and student), using `generator` or
        the default RNG."""
        if self.training and label_dropout:
            label_B = self.drop_labels(label_B, generator)
        x, cond_BD = self.embed(label_B, x_BLCv_wo_first_l)
        cond = self.shared_ada_lin(cond_BD)  # (B, D) or (B, 1, 6, C)
        mask = self.attention_mask(x.device)
        feats = []
        for i, block in enumerate(self.blocks):
            x = run_block(self, block, x, cond, mask)
            if i >= self.depth - return_features:
                feats.append(x)
        return self.finish(x, cond_BD, feats, return_features, head)

    # --- incremental inference (the sampler drives it; docs/var-compat.md §2.8) ---
    def new_kv_cache(self, batch: int, device=None, dtype=torch.float32, capacity: Optional[int] = None) -> KVCache:
        """A cache for `capacity` tokens per row (default: all L)."""
        device = device if device is not None else self.pos_1LC.device
        return KVCache(self.depth, batch, self.num_heads, capacity or self.seq_len, self.width // self.num_heads,
                       device, dtype)

    def class_condition(self, label_B: torch.Tensor) -> torch.Tensor:
        """label_B (B,) -> cond_BD (B, C); label num_classes is the null (unconditional) class."""
        return self.class_emb(label_B)

    def lvl_pos(self) -> torch.Tensor:
        """(1, L, C) level + position embedding of every token."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def first_scale_input(self, cond_BD: torch.Tensor, lvl_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input tokens of scale 0: class token + pos_start + level/position, (B, first_l, C).
        lvl_pos: `lvl_pos()` computed once by the caller (the sampler), else computed here."""
        B = cond_BD.shape[0]
        lvl_pos = self.lvl_pos() if lvl_pos is None else lvl_pos
        return (cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
                + lvl_pos[:, :self.first_l])

    def scale_input(self, x_BlCv: torch.Tensor, si: int, lvl_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input tokens of scale si ≥ 1 from the area-downsampled f̂ (B, pn², Cv) -> (B, pn², C)."""
        bg, ed = self.begin_ends[si]
        lvl_pos = self.lvl_pos() if lvl_pos is None else lvl_pos
        return self.word_embed(x_BlCv) + lvl_pos[:, bg:ed]

    def forward_step(self, cond_BD: torch.Tensor, x_BlC: torch.Tensor, kv_cache: KVCache, si: int = -1,
                     head: bool = True) -> torch.Tensor:
        """One scale of autoregressive inference: x_BlC (B, l, C) the scale's input tokens (from
        first_scale_input / scale_input), attending to every cached token and to each other ->
        logits (B, l, V) float32, or (head=False) the last block's hidden states (B, l, C).
        Appends the scale's keys/values to kv_cache (recorded as scale si)."""
        cond = self.shared_ada_lin(cond_BD)
        x = x_BlC
        for i, block in enumerate(self.blocks):
            x = block(x, cond, None, kv_cache.layer(i))
        kv_cache.length += x_BlC.shape[1]
        kv_cache.scales.append((si, x_BlC.shape[1]))
        return self.get_logits(x, cond_BD) if head else x

    # --- official checkpoints ---
    def official_state_dict(self) -> dict:
        """The official VAR checkpoint content (`var_d*.pth`): same keys, order, shapes, dtypes."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    @torch.no_grad()
    def load_official_state_dict(self, state_dict: dict) -> None:
        """Strictly load an official VAR state dict; UserError naming missing / unexpected / mismatched
        keys. Derived buffers must equal what this model computes (same patch_nums)."""
        own = self.state_dict()
        diff = key_diff(own, state_dict)
        if diff:
            parts = [f"{name} ({len(ks)}): {list_keys(ks)}" for name, ks in
                     (("missing keys", diff.missing), ("unexpected keys", diff.unexpected),
                      ("shape mismatches", diff.mismatched)) if ks]
            raise UserError("VAR state dict does not fit this model (depth/width/patch_nums/vocab?): "
                            + "; ".join(parts))
        for k in own:
            if k.endswith(DERIVED_KEYS_SUFFIXES) and not torch.equal(state_dict[k].to(own[k]), own[k]):
                raise UserError(f"VAR state dict entry {k} differs from the one this model computes from "
                                f"patch_nums {list(self.patch_nums)}")
        self.load_state_dict(state_dict, strict=True)
