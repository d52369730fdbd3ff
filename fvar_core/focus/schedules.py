"""Per-scale schedules of the focus pyramid — defocus radii ρ_k, noise levels β_k (paper Eq. 2–3, docs/design.md §4).

Scales are 1-based in the paper (k = 1 … K); the lists returned here are 0-based, one per scale,
K = len(patch_nums). Radii are in image pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

SCHEDULES = ("cosine", "matched", "linear")

# First zero of the disk PSF's frequency response: J1(2π f ρ) = 0 at 2π f ρ = 3.8317, i.e.
# f0 = 0.6098 / ρ cycles per pixel.
DISK_FIRST_ZERO = 3.8317059702075125 / (2.0 * math.pi)


def view_sizes(patch_nums: Sequence[int], resolution: int) -> list[int]:
    """Pixel size v_k = s_k · (resolution // s_K) of each scale's view (16, 32, …, 256 at 256px)."""
    cell = resolution // patch_nums[-1]
    return [int(p) * cell for p in patch_nums]


def radii(schedule: str, rho_max: float, patch_nums: Sequence[int], resolution: int) -> list[float]:
    """ρ_k in pixels for k = 1 … K, with ρ_1 the coarsest scale and ρ_K = 0.

    - ``cosine``: ρ_k = ρ_max·(1 + cos(π(k−1)/(K−1)))/2. Eq. 2 prints 1 − cos, which increases
      with k; the text (and docs/design.md §4) require ρ_1 = ρ_max > … > ρ_K = 0.
    - ``linear``: ρ_k = ρ_max·(K−k)/(K−1).
    - ``matched``: the disk whose first spectral zero f0 = 0.6098/ρ sits at the Nyquist frequency of
      the scale's view, v_k/2 cycles per image = v_k/(2·resolution) cycles per pixel, i.e.
      ρ_k = 2·0.6098·resolution/v_k = 1.2196·s_K/s_k, capped at ρ_max; ρ_K = 0 (no down-sampling,
      nothing to suppress). Non-increasing rather than strictly decreasing where the cap binds.
    """
    k_total = len(patch_nums)
    if k_total < 2:
        raise ValueError(f"a pyramid needs at least 2 scales, got patch_nums={list(patch_nums)}")
    if schedule == "cosine":
        out = [rho_max * (1.0 + math.cos(math.pi * k / (k_total - 1))) / 2.0 for k in range(k_total)]
    elif schedule == "linear":
        out = [rho_max * (k_total - 1 - k) / (k_total - 1) for k in range(k_total)]
    elif schedule == "matched":
        out = [min(float(rho_max), 2.0 * DISK_FIRST_ZERO * resolution / v) for v in view_sizes(patch_nums, resolution)]
    else:
        raise ValueError(f"unknown radius schedule {schedule!r}; expected one of {SCHEDULES}")
    # cos(π) is -1 exactly but pin the last radius anyway: ρ_K = 0 must give the identity PSF.
    out[-1] = 0.0
    return out


def betas(beta_start: float, beta_end: float, num_scales: int) -> list[float]:
    """β_k of Eq. 3, linear from beta_start (k = 1) to beta_end (k = K)."""
    if num_scales < 1:
        raise ValueError(f"num_scales must be >= 1, got {num_scales}")
    if num_scales == 1:
        return [float(beta_start)]
    return [beta_start + (beta_end - beta_start) * k / (num_scales - 1) for k in range(num_scales)]
