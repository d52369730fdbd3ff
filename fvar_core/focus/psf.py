"""Defocus point-spread functions, applied by direct or FFT convolution (paper §3.2, docs/design.md §4).

A kernel is a normalised (S, S) tap array, S odd, centred, exactly symmetric under flips and
transpose. Kinds:

- ``disk``: the defocus PSF of a circular aperture — a uniform disk of radius ρ pixels. Each tap is
  the *exact* area of its pixel square [j−½, j+½]² covered by the disk (closed-form, no
  supersampling), so the edge is anti-aliased and the kernel varies continuously with ρ. For
  ρ ≤ ½ the disk lies inside the centre pixel and the kernel is exactly the 1×1 identity.
- ``gaussian``: σ = ρ/2, which gives the disk's per-axis second moment ρ²/4; separable, truncated
  at |offset| ≤ 3σ per axis (so ρ < 2/3 is exactly the identity).
- ``box``: a square aperture [−ρ, ρ]² with the same exact-coverage edges as the disk (a moving
  average of continuous width 2ρ, separable); identity for ρ ≤ ½. Its per-axis second moment is
  ρ²/3, slightly wider than the disk's.
- ``area``: always the identity — no refocusing, so the pyramid is VAR's plain area pyramid.

`blur` convolves with reflect padding and picks direct or FFT convolution by kernel size.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("disk", "gaussian", "box", "area")

# Kernel width S from which `blur` switches from direct depthwise conv2d to FFT convolution.
# Timed on this project's CPU box (2 threads, torch 2.14, float32, disk PSF, best of 15; ms per call
# direct / fft):
#   B=1, 3×256²:  S=5 0.83 / 0.78   S=7 1.03 / 1.74   S=9 1.35 / 0.75   S=15 2.66 / 0.87   S=25 7.2 / 0.74
#   B=4, 3×256²:  S=5 11.3 / 2.3    S=7  9.4 / 5.5    S=9 10.7 / 2.1    S=15 16.7 / 2.6    S=25 35 / 2.1
#   B=16, 3×64²:  S=5 0.81 / 1.51   S=7 1.07 / 0.66   S=9 1.42 / 0.50   S=15 2.83 / 0.75   S=25 7.3 / 0.88
# Direct grows ~S² and FFT is flat; they cross at S≈5–9 (noisy). From S=9 on FFT wins every case;
# below it the two are within noise and direct is exact to the last bit (no FFT round-off) and is
# what cuDNN does best on GPU, so it keeps the small kernels.
FFT_MIN_SIZE = 9


def _check(kind: str, rho: float) -> float:
    if kind not in KINDS:
        raise ValueError(f"unknown PSF kind {kind!r}; expected one of {KINDS}")
    rho = float(rho)
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"PSF radius must be finite and >= 0, got {rho}")
    return rho


def _disk_quadrant_area(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed area of the disk |p| ≤ r inside the rectangle spanned by the origin and (x, y).

    Odd in x and in y, so rectangle coverage follows by inclusion–exclusion. For x, y ≥ 0 it is
    ∫₀^min(x,r) min(y, √(r²−t²)) dt, integrated in closed form with P(t) = ∫₀ᵗ √(r²−u²) du.
    """
    sx, sy = np.sign(x), np.sign(y)
    a = np.minimum(np.abs(x), r)
    b = np.abs(y)
    # Below t* the circle is above the rectangle's top edge, so the integrand is the constant y.
    t_star = np.sqrt(np.maximum(r * r - b * b, 0.0))
    lo = np.minimum(a, t_star)

    def p(t: np.ndarray) -> np.ndarray:
        return 0.5 * (t * np.sqrt(np.maximum(r * r - t * t, 0.0)) + r * r * np.arcsin(np.clip(t / r, -1.0, 1.0)))

    return sx * sy * (b * lo + p(a) - p(lo))


def _disk_taps(rho: float) -> np.ndarray:
    # Pixel j covers [j−½, j+½]; it touches the disk iff j − ½ < ρ.
    half = max(math.ceil(rho + 0.5) - 1, 0)
    j = np.arange(-half, half + 1, dtype=np.float64)
    # Evaluate every tap on its canonical (|i| ≥ |j|) octant coordinates so the kernel is
    # bit-exactly symmetric under flips and transpose, not just up to rounding.
    ai, aj = np.abs(j)[:, None], np.abs(j)[None, :]
    u, v = np.maximum(ai, aj), np.minimum(ai, aj)
    g = functools.partial(_disk_quadrant_area, r=rho)
    area = g(u + 0.5, v + 0.5) - g(u - 0.5, v + 0.5) - g(u + 0.5, v - 0.5) + g(u - 0.5, v - 0.5)
    # Inclusion–exclusion leaves ±1e-16 round-off where the true coverage is 0: pixels whose
    # nearest point lies outside the disk get exactly 0.
    outside = np.maximum(u - 0.5, 0) ** 2 + np.maximum(v - 0.5, 0) ** 2 >= rho * rho
    return np.where(outside, 0.0, np.maximum(area, 0.0))


def _box_taps(rho: float) -> np.ndarray:
    half = max(math.ceil(rho + 0.5) - 1, 0)
    j = np.abs(np.arange(-half, half + 1, dtype=np.float64))
    w = np.clip(np.minimum(j + 0.5, rho) - (j - 0.5), 0.0, 1.0)  # length of [j−½, j+½] ∩ [−ρ, ρ]
    return np.outer(w, w)


def _gaussian_taps(rho: float) -> np.ndarray:
    sigma = rho / 2.0
    half = math.floor(3.0 * sigma)
    j = np.abs(np.arange(-half, half + 1, dtype=np.float64))
    w = np.exp(-0.5 * (j / sigma) ** 2)
    return np.outer(w, w)


@functools.lru_cache(maxsize=256)
def _kernel(kind: str, rho: float, dtype: torch.dtype) -> torch.Tensor:
    if kind == "area" or rho == 0.0:
        taps = np.ones((1, 1))
    else:
        taps = {"disk": _disk_taps, "box": _box_taps, "gaussian": _gaussian_taps}[kind](rho)
    # Normalising the float64 taps keeps sum == 1 to the last bit or two; a 1×1 kernel is exactly 1.
    taps = taps / taps.sum()
    return torch.from_numpy(np.ascontiguousarray(taps)).to(dtype)


def psf_kernel(kind: str, rho: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (S, S) PSF of `kind` with radius `rho` pixels, on the CPU; S odd, taps sum to 1.

    Cached on (kind, rho, dtype): repeated calls return the *same* tensor object, shared by every
    caller — treat it as read-only (clone before modifying).
    """
    return _kernel(kind, _check(kind, rho), dtype)


@functools.lru_cache(maxsize=256)
def _kernel_on(kind: str, rho: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Kept per device so a CUDA training loop does not re-upload the kernel every step.
    return _kernel(kind, rho, dtype).to(device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision convolutions lose too many bits over hundreds of taps (and FFTs need fp32+).
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _pad(x: torch.Tensor, half: int) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H+2·half, W+2·half).

    Reflect padding (no edge discontinuity, no brightness bias); reflect needs half < H and W, so a
    kernel wider than the image falls back to replicate padding.
    """
    if half == 0:
        return x
    mode = "reflect" if half < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (half, half, half, half), mode=mode)


def _prepare(x: torch.Tensor, kind: str, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 4:
        raise ValueError(f"blur expects (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"blur expects a floating-point tensor, got {x.dtype}")
    dt = _compute_dtype(x.dtype)
    return x.to(dt), _kernel_on(kind, _check(kind, rho), dt, x.device)


def blur_direct(x: torch.Tensor, kind: str, rho: float) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H, W): depthwise `F.conv2d` (groups=C) with the PSF, reflect-padded."""
    xc, k = _prepare(x, kind, rho)
    s = k.shape[-1]
    if s == 1:
        return x.clone()
    c = xc.shape[1]
    y = F.conv2d(_pad(xc, s // 2), k.expand(c, 1, s, s), groups=c)  # PSFs are symmetric: corr == conv
    return y.to(x.dtype)


def blur_fft(x: torch.Tensor, kind: str, rho: float) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H, W): the same convolution as `blur_direct`, through `torch.fft.rfft2`.

    The reflect-padded image is convolved circularly with the kernel centred at (0, 0); the padding
    is at least the kernel's half-width, so the cropped centre never sees the wrap-around.
    """
    xc, k = _prepare(x, kind, rho)
    s = k.shape[-1]
    if s == 1:
        return x.clone()
    half = s // 2
    xp = _pad(xc, half)  # (B, C, H+2h, W+2h)
    hp, wp = xp.shape[-2:]
    kp = torch.zeros(hp, wp, dtype=k.dtype, device=k.device)
    kp[:s, :s] = k
    kp = torch.roll(kp, shifts=(-half, -half), dims=(0, 1))
    y = torch.fft.irfft2(torch.fft.rfft2(xp) * torch.fft.rfft2(kp), s=(hp, wp))
    h, w = x.shape[-2:]
    return y[..., half:half + h, half:half + w].to(x.dtype).contiguous()


def blur(x: torch.Tensor, kind: str, rho: float) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H, W): x convolved with `psf_kernel(kind, rho)`, same device and dtype.

    Direct convolution below `FFT_MIN_SIZE` taps wide, FFT from there on. float16/bfloat16 inputs
    are convolved in float32 and cast back. An identity kernel (ρ = 0, tiny ρ, kind 'area')
    returns an exact copy of x.
    """
    _check(kind, rho)
    s = _kernel(kind, float(rho), torch.float64).shape[-1]
    return blur_fft(x, kind, rho) if s >= FFT_MIN_SIZE else blur_direct(x, kind, rho)
