"""The dual-path focus pyramid: focused views L_k, area views D_k, alias residuals A_k (paper Eq. 3–4).

For scale k with patch number s_k the view is v_k = s_k · (resolution // s_K) pixels square — the
pixel footprint of that scale's token grid (16, 32, 48, …, 256 at 256px):

    D_k = area_down(x)                     VAR's plain pyramid
    L_k = area_down(PSF_ρk ⋆ x) + β_k ε    the focus pyramid (noise only when cfg.noise)
    A_k = D_k − L_k                        what the defocus removed: mostly folded high frequencies
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from fvar_core.config import PyramidConfig
from fvar_core.errors import UserError
from fvar_core.psf import blur
from fvar_core.schedules import betas, radii, view_sizes


@dataclass
class PyramidViews:
    """The three views of every scale; list index k−1 holds scale k, each tensor (B, C, v_k, v_k)."""

    sizes: list[int]
    rhos: list[float]
    L: list[torch.Tensor]
    D: list[torch.Tensor]
    A: list[torch.Tensor]


def area_down(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, size, size) by area averaging; x itself when already that size."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="area")


def check_pixel_space(cfg: PyramidConfig) -> None:
    """Pixel views need pixel-space radii; latent-space refocusing lives inside the tokenizer."""
    if cfg.space != "pixel":
        raise UserError(f"pyramid.space={cfg.space!r}: latent-space refocusing acts on the tokenizer's "
                        "latent grid, so there are no pixel views to build or analyse; use space 'pixel'")


def check_input(x: torch.Tensor, resolution: int) -> None:
    if tuple(x.shape[-2:]) != (resolution, resolution):
        raise ValueError(f"expected a {resolution}×{resolution} image, got {tuple(x.shape[-2:])}")


def focus_views(x: torch.Tensor, cfg: PyramidConfig, patch_nums: Sequence[int], resolution: int,
                generator: torch.Generator | None = None) -> PyramidViews:
    """x (B, C, resolution, resolution) → PyramidViews with K = len(patch_nums) scales.

    Radii follow `schedules.radii(cfg.schedule, cfg.rho_max, ...)` in image pixels. With cfg.noise,
    L_k gets β_k·ε, ε ~ N(0, 1) drawn from `generator` (on the generator's device, then moved to
    x's), or the global RNG when it is None. Views keep x's device and dtype.
    """
    check_pixel_space(cfg)
    if x.ndim != 4:
        raise ValueError(f"focus_views expects (B, C, H, W), got shape {tuple(x.shape)}")
    check_input(x, resolution)
    sizes = view_sizes(patch_nums, resolution)
    rhos = radii(cfg.schedule, cfg.rho_max, patch_nums, resolution)
    noise = betas(cfg.beta_start, cfg.beta_end, len(sizes)) if cfg.noise else None
    L, D, A = [], [], []
    for k, (v, rho) in enumerate(zip(sizes, rhos)):
        d = area_down(x, v)
        l = area_down(blur(x, cfg.kernel, rho), v)
        if noise is not None:
            gen_device = generator.device if generator is not None else x.device
            eps = torch.randn(l.shape, generator=generator, device=gen_device, dtype=l.dtype)
            l = l + noise[k] * eps.to(l.device)
        D.append(d)
        L.append(l)
        A.append(d - l)
    return PyramidViews(sizes=sizes, rhos=rhos, L=L, D=D, A=A)
