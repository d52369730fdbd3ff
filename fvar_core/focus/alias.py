"""Spectral alias analysis of the pyramid's down-sampling operators (paper §3.4, `fvar pyramid analyze`).

For each scale k, split the (mean-free) image x = x_lo + x_hi with an ideal FFT low-pass whose
passband is the view's band, |f_x| < v_k/2 and |f_y| < v_k/2 cycles per image (a separable box in
frequency). Then, by linearity, for an operator op ∈ {area: area_down, focus: area_down ∘ PSF_ρk}:

    leak_db   = 10·log10(ms(op(x_hi)) / ms(x_hi))   energy above the output Nyquist that survives
                                                    down-sampling (and so folds into the baseband)
    passband  = ms(op(x_lo)) / ms(x_lo)             in-band energy the operator keeps

ms = mean square, so the size change from H² to v_k² pixels is normalised out. Lower leak is better;
passband near 1 is better. Everything is computed in float64.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from fvar_core.config import PyramidConfig
from fvar_core.focus.psf import blur
from fvar_core.focus.pyramid import area_down, check_input, check_pixel_space
from fvar_core.focus.schedules import radii, view_sizes


@dataclass
class ScaleAlias:
    """Alias figures of one scale. A leak of -inf means "nothing to leak" (see `alias_report`)."""

    scale: int  # 1-based, as in the paper
    size: int  # v_k, pixels
    rho: float  # PSF radius, pixels
    leak_db_area: float
    leak_db_focus: float
    passband_area: float
    passband_focus: float

    @property
    def margin_db(self) -> float:
        """How much less the focus operator leaks than plain area-down (0 when neither can leak)."""
        if math.isinf(self.leak_db_area) and math.isinf(self.leak_db_focus):
            return 0.0
        return self.leak_db_area - self.leak_db_focus

    def to_dict(self) -> dict:
        """JSON-ready: -inf (no energy above the output Nyquist) becomes None."""
        d = asdict(self)
        d["margin_db"] = self.margin_db
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def _ms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean())


def _band_split(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) → x_lo, x_hi with x_lo the part at |f_x|, |f_y| < size/2 cycles per image."""
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h, dtype=x.dtype).abs() < size / 2  # cycles per image
    fx = torch.fft.rfftfreq(w, d=1.0 / w, dtype=x.dtype).abs() < size / 2
    mask = (fy[:, None] & fx[None, :]).to(x.dtype)
    lo = torch.fft.irfft2(torch.fft.rfft2(x) * mask, s=(h, w))
    return lo, x - lo


def _leak_db(out_ms: float, in_ms: float) -> float:
    if in_ms == 0.0:
        return -math.inf
    # An exactly zero output (e.g. a line spectrum that down-sampling annihilates) is also -inf.
    return 10.0 * math.log10(out_ms / in_ms) if out_ms > 0.0 else -math.inf


def alias_report(x: torch.Tensor, cfg: PyramidConfig, patch_nums: Sequence[int],
                 resolution: int) -> list[ScaleAlias]:
    """x (C, H, W) or (B, C, H, W) at resolution² → one ScaleAlias per scale, coarsest first.

    The last scale (v_K = resolution) does not down-sample, so its passband is taken to be the whole
    spectrum: x_hi = 0, both leaks are -inf (None in `to_dict`), margin 0. Likewise at any scale
    where x has no energy above the band. A zero-energy passband (a constant image) reports 1.0.
    """
    check_pixel_space(cfg)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"alias_report expects (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
    check_input(x, resolution)
    x = x.detach().to("cpu", torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    sizes = view_sizes(patch_nums, resolution)
    rhos = radii(cfg.schedule, cfg.rho_max, patch_nums, resolution)
    out = []
    for k, (v, rho) in enumerate(zip(sizes, rhos)):
        if v >= resolution:
            lo, hi = x, torch.zeros_like(x)
        else:
            lo, hi = _band_split(x, v)

        def area(t: torch.Tensor) -> torch.Tensor:
            return area_down(t, v)

        def focus(t: torch.Tensor) -> torch.Tensor:
            return area_down(blur(t, cfg.kernel, rho), v)

        ms_lo, ms_hi = _ms(lo), _ms(hi)
        out.append(ScaleAlias(
            scale=k + 1, size=v, rho=rho,
            leak_db_area=_leak_db(_ms(area(hi)), ms_hi) if ms_hi else -math.inf,
            leak_db_focus=_leak_db(_ms(focus(hi)), ms_hi) if ms_hi else -math.inf,
            passband_area=_ms(area(lo)) / ms_lo if ms_lo else 1.0,
            passband_focus=_ms(focus(lo)) / ms_lo if ms_lo else 1.0,
        ))
    return out


def image_leakage(x: torch.Tensor, patch_nums: Sequence[int], resolution: int) -> torch.Tensor:
    """How much each image would alias under VAR's plain pyramid: x (B, C, R, R) → (B, K−1) float64,
    per down-sampling scale k the energy above that view's band that survives area_down_k (and so
    folds into its baseband), as a fraction of the image's (mean-free) energy. Jagged or noisy
    images score higher than smooth ones; the ablation compares generated with real images."""
    if x.ndim != 4:
        raise ValueError(f"image_leakage expects (B, C, H, W), got shape {tuple(x.shape)}")
    check_input(x, resolution)
    x = x.detach().to("cpu", torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    total = x.pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-30)
    cols = []
    for v in view_sizes(patch_nums, resolution):
        if v >= resolution:
            continue
        _, hi = _band_split(x, v)
        cols.append(area_down(hi, v).pow(2).mean(dim=(1, 2, 3)) / total)
    return torch.stack(cols, dim=1)
