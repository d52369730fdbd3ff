"""Multi-scale residual quantizer: VAR's `VectorQuantizer2` (docs/var-compat.md §1.3–1.4) + FVAR's dual path.

VAR's encoding of a latent f (B, Cz, H, W), scales k = 0..K−1 with patch numbers pn_k, H = pn_{K−1}:

    r_0 = f,  f̂_{−1} = 0
    idx_k = argmin_v ‖area_down_k(r_k) − E_v‖²            (no down-sampling at the last scale)
    h_k   = φ_{t(k)}(bicubic_up(E[idx_k]))                 (no up-sampling at the last scale)
    f̂_k  = f̂_{k−1} + h_k,   r_{k+1} = r_k − h_k

FVAR's dual path (docs/design.md §5) swaps the *target* of scale k for the focus latent z_k = E(PSF_ρk ⋆ x):
the structure codebook codes area_down_k(z_k − f̂_{k−1}); an optional alias codebook codes the
difference of the two views, area_down_k(f − f̂_{k−1}) − area_down_k(z_k − f̂_{k−1}) =
area_down_k(f − z_k). f̂, decoding and the transformer's next-scale input are VAR's unchanged, so a
student trained on FVAR tokens runs in VAR's inference code.

Token order inside a scale is row-major (h, w); scales are concatenated small → large.
State-dict keys follow the official module (`quantize.` prefix in the tokenizer):
    ema_vocab_hit_SV (K, V) buffer · quant_resi.* (φ convs, layout below) · embedding.weight (V, Cz)
    + FVAR only: alias_embedding.weight (Va, Cz)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import distributed as tdist

from fvar_core.config import TokenizerConfig
from fvar_core.errors import UserError

# Extension keys of this module that the official VQVAE does not have (dropped on export).
ALIAS_EMBEDDING_KEY = "alias_embedding.weight"

# φ used by each scale with K=4 partially shared convs, as VAR's code picks them (docs/var-compat.md §1.4).
# Scales 2 and 7 of the 10-scale schedule are exact ties in real arithmetic that float64 rounding
# breaks towards φ1 and φ3; writing the tables down keeps that choice from hiding in rounding.
VAR_PHI_TABLES = {
    10: (0, 0, 1, 1, 1, 2, 2, 3, 3, 3),
    14: (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3),
}


def official_phi_index(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """φ index per scale exactly as the official float64 computation picks it:
    ticks = linspace(1/3/N, 1−1/3/N, N) if N == 4 else linspace(1/2/N, 1−1/2/N, N), N = num_phi;
    scale si uses argmin |ticks − si/(K−1)| (first index on ties)."""
    if num_phi == 1:
        return (0,) * num_scales
    n = num_phi
    ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)
    denom = max(num_scales - 1, 1)
    return tuple(int(np.argmin(np.abs(ticks - si / denom))) for si in range(num_scales))


def default_phi_index(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """VAR's measured table for 10 / 14 scales with 4 φ, the official computation otherwise."""
    if num_phi == 4 and num_scales in VAR_PHI_TABLES:
        return VAR_PHI_TABLES[num_scales]
    return official_phi_index(num_scales, num_phi)


class Phi(nn.Conv2d):
    """φ(h) = (1 − r)·h + r·conv3×3(h), r = |quant_resi| (0.5 in the release). (B, Cz, H, W) → same."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


def _make_phi(channels: int, quant_resi: float) -> nn.Module:
    # The official code replaces φ by the identity (and stores no weights) when r ≈ 0.
    return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


# Three containers only because the official key names differ by sharing mode:
#   share_quant_resi == 0 → quant_resi.{i}.*          (one φ per scale)
#   share_quant_resi == 1 → quant_resi.qresi.*        (one φ for all scales)
#   share_quant_resi >= 2 → quant_resi.qresi_ls.{i}.* (the release: 4 partially shared φ)
class PhiNonShared(nn.ModuleList):
    @property
    def phis(self) -> List[nn.Module]:
        return list(self)


class PhiShared(nn.Module):
    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    @property
    def phis(self) -> List[nn.Module]:
        return [self.qresi]


class PhiPartiallyShared(nn.Module):
    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls

    @property
    def phis(self) -> List[nn.Module]:
        return list(self.qresi_ls)


def nearest_code(z_NC: torch.Tensor, E_VC: torch.Tensor, with_margin: bool = False):
    """Index of the nearest codebook row by squared L2, VAR's float32 arithmetic exactly:
    d = (|z|² + |E|²) − 2 z Eᵀ as one addmm (alpha=−2), argmin = first index on ties.
    Returns idx (N,) long, and with_margin the gap between the second and first distance (N,)."""
    d = z_NC.square().sum(dim=1, keepdim=True) + E_VC.square().sum(dim=1)  # (N, V)
    d.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)
    idx = d.argmin(dim=1)
    if not with_margin:
        return idx, None
    two = d.topk(2, dim=1, largest=False).values
    return idx, two[:, 1] - two[:, 0]


def _to_NC(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B·h·w, C), row-major token order."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@dataclass
class FocusTokens:
    """Result of `MultiScaleQuantizer.encode_focus` (also of plain encoding, with alias None).

    structure: K tensors (B, pn_k²) long — the tokens the transformer predicts (VAR's tokens).
    alias:     K tensors (B, pn_k²) long, or None without an alias codebook.
    fhat:      K tensors (B, Cz, H, W) — accumulated f̂ after each scale (VAR's f̂, unchanged).
    margin:    K tensors (B, pn_k²) — nearest-vs-second structure code distance gap, if asked.
    energy:    K dicts of (B,) mean squares per image, if asked (the alias audit): "structure" =
               ms(area_down_k(z_k − f̂_{k−1})), what the structure codebook codes; "alias" =
               ms(area_down_k(f − z_k)); "alias_error" = ms of what the alias code misses.
    """

    structure: List[torch.Tensor]
    alias: Optional[List[torch.Tensor]]
    fhat: List[torch.Tensor]
    margin: Optional[List[torch.Tensor]] = None
    energy: Optional[List[Dict[str, torch.Tensor]]] = None


@dataclass
class VQOutput:
    """Result of the training forward `MultiScaleQuantizer.forward`.

    f_hat:      (B, Cz, H, W) straight-through f̂ (values of f̂, gradient of f) for the decoder.
    vq_loss:    scalar, mean over scales of β·MSE(sg(f̂_k), t_k) + MSE(f̂_k, sg(t_k)), t_k the target.
    alias_loss: scalar for the alias codebook (codebook term only: its input is detached), or None.
    idx / alias_idx: K tensors (B, pn_k²).
    hits_SV:    (K, V) float — how often each structure code was chosen at each scale.
    alias_energy: scalar mean over scales of MSE(a_k, 0), the alias residual's own size (so
                alias_loss / alias_energy is the fraction the alias codebook fails to code), or None.
    alias_ratio: Σ_k MSE(a_k, 0) / Σ_k MSE(r_k, 0), r_k the structure residual area_down_k(t_k − f̂_{k−1})
                the main codebook codes: the alias residual's size relative to the signal, which the
                latent's overall scale cancels out of (alias_energy alone moves with that scale;
                docs/alias-audit.md), or None.
    """

    f_hat: torch.Tensor
    vq_loss: torch.Tensor
    alias_loss: Optional[torch.Tensor]
    idx: List[torch.Tensor]
    alias_idx: Optional[List[torch.Tensor]]
    hits_SV: torch.Tensor
    alias_energy: Optional[torch.Tensor] = None
    alias_ratio: Optional[torch.Tensor] = None


class MultiScaleQuantizer(nn.Module):
    """VAR's multi-scale residual quantizer with an optional alias codebook."""

    def __init__(self, cfg: TokenizerConfig, patch_nums: Sequence[int]):
        super().__init__()
        self.patch_nums = tuple(int(p) for p in patch_nums)
        K = len(self.patch_nums)
        self.vocab_size = cfg.vocab_size
        self.Cvae = cfg.z_channels
        self.beta = cfg.beta
        self.shared_codebook = cfg.shared_codebook

        n_phi = cfg.share_quant_resi or K
        make = lambda: _make_phi(cfg.z_channels, cfg.quant_resi)  # noqa: E731
        if cfg.share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make() for _ in range(n_phi)])
        elif cfg.share_quant_resi == 1:
            self.quant_resi = PhiShared(make())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make() for _ in range(n_phi)]))
        try:  # a preset has checked it already; a config built in code has not
            cfg.check_phi_index(K)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.phi_index = tuple(cfg.phi_index) if cfg.phi_index is not None else default_phi_index(K, n_phi)

        # Codebook usage per scale (VAR keeps it in the checkpoint; only statistics, never used to code).
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(K, cfg.vocab_size))
        self.record_hit = 0
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        self.alias_embedding = (nn.Embedding(cfg.alias_vocab_size, cfg.z_channels)
                                if cfg.alias_vocab_size > 0 else None)

    # ----------------------------------------------------------------------------------- helpers
    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def has_alias(self) -> bool:
        return self.alias_embedding is not None or self.shared_codebook

    @property
    def alias_codebook(self) -> Optional[torch.Tensor]:
        """(Va, Cz) codebook of the alias path: its own, the structure one when shared, or None."""
        if self.alias_embedding is not None:
            return self.alias_embedding.weight
        return self.embedding.weight if self.shared_codebook else None

    def phi(self, si: int) -> nn.Module:
        """The φ conv of scale si."""
        return self.quant_resi.phis[self.phi_index[si]]

    def _add_scale(self, f_hat: torch.Tensor, code_BChw: torch.Tensor, si: int, *,
                   encoder_layout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """VAR's recurrence at scale si: h = φ_si(bicubic_up(code)), f̂ ← f̂ + h. Returns (f̂, h).

        code_BChw (B, Cz, pn, pn) code vectors; h and f̂ (B, Cz, H, W). The last scale is already
        full size and is not interpolated. f̂ is updated in place unless autograd tracks either
        operand. encoder_layout makes the up-sampled map contiguous before φ, as VAR's encoder
        does (its decoder and sampler do not); the two layouts round φ's conv differently in the
        last bit, and each path matches its official counterpart bit for bit.
        """
        H = self.patch_nums[-1]
        h = code_BChw
        if si != self.num_scales - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")  # align_corners=False, a = −0.75
        h = self.phi(si)(h.contiguous() if encoder_layout else h)
        if torch.is_grad_enabled() and (f_hat.requires_grad or h.requires_grad):
            return f_hat + h, h
        return f_hat.add_(h), h

    @staticmethod
    def _residual(target: torch.Tensor, hs: Sequence[torch.Tensor]) -> torch.Tensor:
        """target − f̂ for a new target, formed as VAR forms f − f̂ (subtract each h in order, not
        their sum) so equal latents give bit-identical tokens. A detached copy."""
        r = target.detach().clone()
        for h in hs:
            r.sub_(h)
        return r

    def down(self, x: torch.Tensor, si: int) -> torch.Tensor:
        """area_down_k: (B, Cz, H, W) → (B, Cz, pn_k, pn_k); identity at the last scale."""
        pn = self.patch_nums[si]
        return x if si == self.num_scales - 1 else F.interpolate(x, size=(pn, pn), mode="area")

    def embed(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Code vectors of (B, pn²) indices as a (B, Cz, pn, pn) map (a channels-last view, as the
        official code builds it)."""
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).view(B, self.Cvae, pn, pn)

    def _check_f(self, f: torch.Tensor) -> None:
        H = self.patch_nums[-1]
        if f.ndim != 4 or f.shape[1] != self.Cvae or tuple(f.shape[2:]) != (H, H):
            raise UserError(f"latent of shape {tuple(f.shape)} does not match the quantizer "
                            f"(B, {self.Cvae}, {H}, {H}) for patch_nums {list(self.patch_nums)}")

    # ---------------------------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode_focus(self, f_full: torch.Tensor, f_focus: Optional[Sequence[torch.Tensor]] = None,
                     with_margin: bool = False, with_energy: bool = False) -> FocusTokens:
        """Dual-path multi-scale encoding.

        f_full:  (B, Cz, H, W) latent of the sharp image, E(x).
        f_focus: K latents (B, Cz, H, W), z_k = E(PSF_ρk ⋆ x); None = VAR (z_k = f_full for all k).
        With f_focus[k] == f_full for every k and no alias codebook the tokens and f̂ are
        bit-identical to VAR's `f_to_idxBl_or_fhat`.
        """
        self._check_f(f_full)
        K = self.num_scales
        if f_focus is not None and len(f_focus) != K:
            raise UserError(f"{len(f_focus)} focus latents given for {K} scales")
        # Detach once per distinct tensor so "same object" (scales sharing a latent) survives.
        prepared = {id(f_full): f_full.detach().float()}
        if f_focus is not None:
            for z in f_focus:
                prepared.setdefault(id(z), z.detach().float())
        targets = [prepared[id(f_full if f_focus is None else z)] for z in (f_focus or [None] * K)]
        f_full = prepared[id(f_full)]
        E = self.embedding.weight.detach()
        Ea = self.alias_codebook
        Ea = Ea.detach() if Ea is not None else None
        B, C, H, W = f_full.shape

        f_hat = torch.zeros_like(f_full)
        hs: List[torch.Tensor] = []  # h_k of the scales done, to rebuild a residual for a new target
        src, f_rest = f_full, f_full.clone()
        structure, alias, fhats, margins = [], ([] if Ea is not None else None), [], ([] if with_margin else None)
        energy: Optional[List[Dict[str, torch.Tensor]]] = [] if with_energy else None

        def ms(x: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) → (B,)
            return x.square().mean(dim=(1, 2, 3))

        for si, pn in enumerate(self.patch_nums):
            z_k = targets[si]
            if z_k is not src:  # a new target: its residual z_k − f̂_{k−1}
                src, f_rest = z_k, self._residual(z_k, hs)

            r = self.down(f_rest, si)
            idx_N, margin = nearest_code(_to_NC(r), E, with_margin)
            e_k = {"structure": ms(r)} if with_energy else {}
            if Ea is not None:
                # Difference of the two views, area_down(f − f̂) − area_down(z_k − f̂), computed
                # as area_down(f − z_k) (equal by linearity, without f̂'s cancellation).
                a = self.down(f_full - z_k, si)
                a_idx, _ = nearest_code(_to_NC(a), Ea)
                alias.append(a_idx.view(B, pn * pn))
                if with_energy:
                    e_k["alias"] = ms(a)
                    e_k["alias_error"] = ms(Ea[a_idx].view(B, pn, pn, C).permute(0, 3, 1, 2) - a)
            if energy is not None:
                energy.append(e_k)

            f_hat, h = self._add_scale(f_hat, self.embed(idx_N.view(B, pn * pn), pn), si, encoder_layout=True)
            f_rest.sub_(h)
            hs.append(h)
            structure.append(idx_N.view(B, pn * pn))
            fhats.append(f_hat.clone())
            if with_margin:
                margins.append(margin.view(B, pn * pn))
        return FocusTokens(structure=structure, alias=alias, fhat=fhats, margin=margins, energy=energy)

    def f_to_idx(self, f: torch.Tensor) -> List[torch.Tensor]:
        """VAR's tokens of a latent: K tensors (B, pn_k²) long."""
        return self.encode_focus(f).structure

    def f_to_fhat_per_scale(self, f: torch.Tensor) -> List[torch.Tensor]:
        """Accumulated f̂ after each scale: K tensors (B, Cz, H, W)."""
        return self.encode_focus(f).fhat

    # ---------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor], last_only: bool = True):
        """f̂ = Σ_k φ_k(bicubic_up(E[idx_k])): the final (B, Cz, H, W) map, or all K partial sums."""
        if len(idx_list) != self.num_scales:
            raise UserError(f"{len(idx_list)} token maps given for {self.num_scales} scales")
        B = idx_list[0].shape[0]
        H = self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, H, H, device=idx_list[0].device, dtype=torch.float32)
        out = []
        for si, (idx, pn) in enumerate(zip(idx_list, self.patch_nums)):
            f_hat, _ = self._add_scale(f_hat, self.embed(idx, pn), si)
            if not last_only:
                out.append(f_hat.clone())
        return f_hat if last_only else out

    @torch.no_grad()
    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the transformer (VAR's `idxBl_to_var_input`).

        The input of scale k+1 is the accumulated f̂ after scales 0..k, area-downsampled to
        pn_{k+1}: (B, L − pn_0², Cz) float32; the last scale's codes are never needed.
        """
        B = idx_list[0].shape[0]
        H = self.patch_nums[-1]
        f_hat = torch.zeros(B, self.Cvae, H, H, device=idx_list[0].device, dtype=torch.float32)
        nxt = []
        for si in range(self.num_scales - 1):
            f_hat, _ = self._add_scale(f_hat, self.embed(idx_list[si], self.patch_nums[si]), si)
            pn = self.patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").view(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(nxt, dim=1)

    @torch.no_grad()
    def next_ar_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        """One sampling step (VAR's `get_next_autoregressive_input`): f̂ += φ(bicubic_up(h)) in place.

        h_BChw: (B, Cz, pn_si, pn_si) code vectors of scale si. Returns (f̂, next input), the next
        input being area_down(f̂) to pn_{si+1} (B, Cz, pn, pn), or f̂ itself after the last scale.
        """
        f_hat, _ = self._add_scale(f_hat, h_BChw, si)
        if si == self.num_scales - 1:
            return f_hat, f_hat
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    # ---------------------------------------------------------------------------------- training
    def forward(self, f: torch.Tensor, f_focus: Optional[Sequence[torch.Tensor]] = None) -> VQOutput:
        """Tokenizer-training forward: straight-through f̂, VQ losses and per-scale code usage.

        f: (B, Cz, H, W) latent of the sharp image (with gradient to the encoder); f_focus: K focus
        latents or None (VAR). The target of scale k is t_k = z_k (= f for VAR, and at the last
        scale where z_K = E(x)), so f̂_k is pulled towards the focus latent it coded.
        """
        self._check_f(f)
        f = f.float()
        B, C, H, W = f.shape
        K = self.num_scales
        targets = [f] * K if f_focus is None else [z.float() for z in f_focus]
        E = self.embedding.weight
        Ea = self.alias_codebook

        with torch.autocast(device_type=f.device.type, enabled=False):  # VQ in float32, as VAR
            f_hat = torch.zeros_like(f)
            hs: List[torch.Tensor] = []
            src, f_rest = None, None
            vq_loss = f.new_zeros(())
            alias_loss = f.new_zeros(()) if Ea is not None else None
            alias_energy = f.new_zeros(()) if Ea is not None else None
            structure_energy = f.new_zeros(())
            hits = torch.zeros(K, self.vocab_size, device=f.device)
            idx_list, alias_list = [], ([] if Ea is not None else None)
            for si, pn in enumerate(self.patch_nums):
                t = targets[si]
                if t is not src:  # a new target: its residual t_k − f̂_{k−1}
                    src, f_rest = t, self._residual(t, hs)
                r = self.down(f_rest, si).detach()
                structure_energy = structure_energy + r.square().mean()
                idx_N, _ = nearest_code(_to_NC(r), E.detach())
                hits[si] = idx_N.bincount(minlength=self.vocab_size).float()
                f_hat, h = self._add_scale(f_hat, self.embed(idx_N.view(B, pn * pn), pn).contiguous(), si)
                f_rest.sub_(h.detach())
                hs.append(h.detach())
                idx_list.append(idx_N.view(B, pn * pn))
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), t) + F.mse_loss(f_hat, t.detach())

                if Ea is not None:
                    # The alias codebook learns to code the encoder's alias residual; it does not
                    # shape the encoder. A commitment term here (gradient into both encodes) would
                    # reward the encoder for cancelling the residual, E(PSF⋆x) → E(x), turning the
                    # focus path into VAR's. (Measured: in short CPU runs the residual still shrinks
                    # ~100× relative to E(x)², identically with alias_weight 0 — an early encoder
                    # codes colours and layout, which the blur does not change, not this loss.)
                    a = self.down(f - t, si).detach()  # (B, Cz, pn, pn)
                    a_idx, _ = nearest_code(_to_NC(a), Ea.detach())
                    e = F.embedding(a_idx.view(B, pn, pn), Ea).permute(0, 3, 1, 2)
                    alias_loss = alias_loss + F.mse_loss(e, a)
                    alias_energy = alias_energy + a.square().mean()
                    alias_list.append(a_idx.view(B, pn * pn))

            vq_loss = vq_loss / K
            alias_ratio = None
            if alias_loss is not None:
                alias_ratio = alias_energy / structure_energy.clamp_min(1e-30)
                alias_loss, alias_energy = alias_loss / K, alias_energy / K
            f_hat_st = (f_hat.detach() - f.detach()) + f  # straight-through to the encoder

        if self.training:
            self._update_usage(hits)
        return VQOutput(f_hat=f_hat_st, vq_loss=vq_loss, alias_loss=alias_loss, idx=idx_list,
                        alias_idx=alias_list, hits_SV=hits, alias_energy=alias_energy, alias_ratio=alias_ratio)

    @torch.no_grad()
    def _update_usage(self, hits_SV: torch.Tensor) -> None:
        # VAR's schedule (copy, then EMA 0.9 for 100 steps, then 0.99), summed over processes.
        # VAR updates it only under torch.distributed; a single process deserves the statistic too.
        if tdist.is_available() and tdist.is_initialized():
            hits_SV = hits_SV.clone()
            tdist.all_reduce(hits_SV)
        if self.record_hit == 0:
            self.ema_vocab_hit_SV.copy_(hits_SV)
        elif self.record_hit < 100:
            self.ema_vocab_hit_SV.mul_(0.9).add_(hits_SV.mul(0.1))
        else:
            self.ema_vocab_hit_SV.mul_(0.99).add_(hits_SV.mul(0.01))
        self.record_hit += 1

    def usage_percent(self, tokens_per_step: int) -> List[float]:
        """Per scale, % of codes whose EMA hit count reaches 8% of a uniform share (VAR's
        `ret_usages` rule: margin = world · tokens_per_step / V · 0.08, tokens_per_step = B·H·W)."""
        world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
        margin = world * tokens_per_step / self.vocab_size * 0.08
        return [(row >= margin).float().mean().item() * 100 for row in self.ema_vocab_hit_SV]
