"""The focus pyramid (paper Eq. 2–4): the K focus images of an image — what the tokenizer encodes,
what the views are made of (focused L_k, area D_k, alias residual A_k).

`focus_images` is the one place the focus views are made: ρ_k from `schedules.radii`, the PSF
from `psf.blur`, β_k ε when cfg.noise, and x itself (the same object) at scales whose ρ_k is
below half a pixel or whose kernel is 'area' — the rule that lets the tokenizer reuse E(x) there.

For scale k with patch number s_k the view is v_k = s_k · (resolution // s_K) pixels square — the
pixel footprint of that scale's token grid (16, 32, 48, …, 256 at 256px):

    F_k = PSF_ρk ⋆ x + β_k ε               the focus image (x itself when sharp; noise only when cfg.noise)
    D_k = area_down(x)                     VAR's plain pyramid
    L_k = area_down(F_k)                   the focus pyramid
    A_k = D_k − L_k                        what the defocus removed: mostly folded high frequencies
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from fvar_core.config import PyramidConfig
from fvar_core.errors import UserError
from fvar_core.focus.psf import blur
from fvar_core.focus.schedules import betas, radii, view_sizes


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


# Below half a pixel (or grid cell) every PSF of `psf` is the identity: such a scale is sharp.
SHARP_BELOW = 0.5


def focused_scales(cfg: PyramidConfig, rhos: Sequence[float]) -> list[bool]:
    """Per scale, whether its focus image differs from x (kernel not 'area' and ρ_k ≥ ½)."""
    return [cfg.kernel != "area" and rho >= SHARP_BELOW for rho in rhos]


def focus_images(x: torch.Tensor, cfg: PyramidConfig, patch_nums: Sequence[int], resolution: int,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """x (B, C, R, R), R = resolution → K = len(patch_nums) focus images F_k (B, C, R, R).

    F_k = PSF_ρk ⋆ x (+ β_k ε with cfg.noise), ρ_k = `schedules.radii(...)` in units of x's
    pixels (image pixels, or latent cells when x is a latent and R its side). A sharp scale
    (`focused_scales`) gets x itself — the same object, never noised, so z_K = E(x) stays exact —
    and without noise equal radii share one object, so a batched encode codes each view once.
    ε ~ N(0, 1) comes from `generator` (on its device, then moved to x's) or the global RNG.
    The PSF runs in x's dtype even under autocast.
    """
    if x.ndim != 4:
        raise ValueError(f"focus views expect (B, C, H, W), got shape {tuple(x.shape)}")
    check_input(x, resolution)
    rhos = radii(cfg.schedule, cfg.rho_max, patch_nums, resolution)
    beta = betas(cfg.beta_start, cfg.beta_end, len(rhos))
    views: list[torch.Tensor] = []
    shared: dict[float, torch.Tensor] = {}
    with torch.autocast(x.device.type, enabled=False):
        for k, (rho, focused) in enumerate(zip(rhos, focused_scales(cfg, rhos))):
            if not focused:
                views.append(x)
            elif cfg.noise:
                dev = generator.device if generator is not None else x.device
                eps = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
                views.append(blur(x, cfg.kernel, rho) + beta[k] * eps)
            else:
                if rho not in shared:
                    shared[rho] = blur(x, cfg.kernel, rho)
                views.append(shared[rho])
    return views


def focus_views(x: torch.Tensor, cfg: PyramidConfig, patch_nums: Sequence[int], resolution: int,
                generator: torch.Generator | None = None) -> PyramidViews:
    """x (B, C, resolution, resolution) → PyramidViews with K = len(patch_nums) scales: the
    `focus_images` the tokenizer encodes, area-downsampled to each scale's view size (pixel space
    only). Views keep x's device and dtype."""
    check_pixel_space(cfg)
    sizes = view_sizes(patch_nums, resolution)
    rhos = radii(cfg.schedule, cfg.rho_max, patch_nums, resolution)
    F_k = focus_images(x, cfg, patch_nums, resolution, generator)
    D = [area_down(x, v) for v in sizes]
    L = [area_down(f, v) for f, v in zip(F_k, sizes)]
    return PyramidViews(sizes=sizes, rhos=rhos, L=L, D=D, A=[d - l for d, l in zip(D, L)])
