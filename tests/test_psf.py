"""PSF kernels and blur: normalisation, symmetry, identity, direct/FFT agreement, devices."""
import math

import pytest
import torch

from fvar_core.focus import psf
from fvar_core.focus.psf import blur, blur_direct, blur_fft, psf_kernel

KINDS = ["disk", "gaussian", "box", "area"]
RADII = [0.0, 0.3, 0.5, 0.7, 1.0, 1.4, 3.0, 4.96, 7.04, 12.0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rho", RADII)
def test_kernel_is_odd_square_sums_to_one_and_is_symmetric(kind, rho):
    k = psf_kernel(kind, rho)
    s = k.shape[0]
    assert k.shape == (s, s) and s % 2 == 1
    assert k.dtype == torch.float64
    assert abs(float(k.sum()) - 1.0) < 1e-14
    assert (k >= 0).all()
    assert torch.equal(k, k.flip(0)) and torch.equal(k, k.flip(1)) and torch.equal(k, k.T)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_radius_kernel_is_exact_identity(kind):
    assert torch.equal(psf_kernel(kind, 0.0), torch.ones(1, 1, dtype=torch.float64))


@pytest.mark.parametrize("rho", [0.1, 0.49, 0.5])
def test_disk_inside_centre_pixel_is_identity(rho):
    assert psf_kernel("disk", rho).shape == (1, 1)


def test_area_kind_is_identity_at_any_radius():
    assert psf_kernel("area", 12.0).shape == (1, 1)


def test_disk_support_grows_with_radius():
    sizes = [psf_kernel("disk", r).shape[0] for r in (0.4, 1.0, 1.6, 3.0, 7.0, 12.0)]
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] == 25
    # Pixel j is touched iff j − ½ < ρ: ρ = 1.4 needs the ±1 ring only, ρ = 1.6 reaches ±2.
    assert psf_kernel("disk", 1.4).shape == (3, 3) and psf_kernel("disk", 1.6).shape == (5, 5)


def test_disk_taps_are_exact_pixel_coverage():
    # Unnormalised sum is the disk area; full interior taps are 1, so ratios pin the edge taps.
    rho = 3.0
    k = psf_kernel("disk", rho) * math.pi * rho ** 2
    assert k[3, 3] == pytest.approx(1.0, abs=1e-12)  # centre pixel fully inside
    # Fine supersampling of the edge pixel (3, 0) offset: columns [2.5, 3.5] × [-0.5, 0.5].
    n = 2000
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n - 0.5
    xx, yy = 3.0 + t[:, None], t[None, :]
    cover = ((xx ** 2 + yy ** 2) <= rho ** 2).double().mean()
    assert float(k[6, 3]) == pytest.approx(float(cover), abs=1e-3)


def test_gaussian_second_moment_matches_disk():
    j = torch.arange(-12, 13, dtype=torch.float64)
    for kind, rho in (("disk", 8.0), ("gaussian", 8.0)):
        k = psf_kernel(kind, rho)
        h = k.shape[0] // 2
        m2 = float((k.sum(0) * j[12 - h:13 + h] ** 2).sum())
        assert m2 == pytest.approx(rho ** 2 / 4, rel=0.03)


def test_kernel_cache_returns_same_object_and_blur_does_not_mutate_it():
    a = psf_kernel("disk", 5.0)
    b = psf_kernel("disk", 5.0)
    assert a is b
    before = a.clone()
    x = torch.rand(1, 2, 32, 32, dtype=torch.float64)
    blur_direct(x, "disk", 5.0)
    blur_fft(x, "disk", 5.0)
    assert torch.equal(psf_kernel("disk", 5.0), before)
    assert psf_kernel("disk", 5.0, torch.float32) is not a  # dtype is part of the key


@pytest.mark.parametrize("kind", KINDS)
def test_identity_kernel_blur_returns_x_exactly(kind):
    x = torch.rand(2, 3, 16, 16)
    y = blur(x, kind, 0.0)
    assert torch.equal(y, x) and y is not x


@pytest.mark.parametrize("kind", ["disk", "gaussian", "box"])
@pytest.mark.parametrize("rho", [0.7, 1.4, 3.0, 7.04, 12.0, 40.0])
def test_fft_and_direct_agree_in_float64(kind, rho):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 40, generator=g, dtype=torch.float64)
    d, f = blur_direct(x, kind, rho), blur_fft(x, kind, rho)
    assert d.shape == f.shape == x.shape
    assert (d - f).abs().max() < 1e-6


def test_blur_dispatches_by_kernel_size(monkeypatch):
    calls = []
    monkeypatch.setattr(psf, "blur_fft", lambda *a: calls.append("fft"))
    monkeypatch.setattr(psf, "blur_direct", lambda *a: calls.append("direct"))
    x = torch.rand(1, 1, 64, 64)
    small = (psf.FFT_MIN_SIZE - 1) / 2 - 0.6  # a disk narrower than the threshold
    psf.blur(x, "disk", small)
    psf.blur(x, "disk", 12.0)
    assert calls == ["direct", "fft"]


@pytest.mark.parametrize("rho", [1.4, 12.0])
def test_blur_preserves_constant_images_and_the_mean(rho):
    c = torch.full((1, 3, 40, 40), 0.37, dtype=torch.float64)
    assert (blur(c, "disk", rho) - c).abs().max() < 1e-12
    # Taps sum to 1 and reflect padding adds no brightness bias: the mean moves only by boundary effects.
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (blur(x, "disk", rho).mean() - x.mean()).abs() < 2e-3


def test_kernel_wider_than_image_falls_back_to_replicate_padding():
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    y = blur(x, "disk", 12.0)  # 25 taps on an 8×8 image
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (blur_direct(x, "disk", 12.0) - blur_fft(x, "disk", 12.0)).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blur_keeps_low_precision_dtype(dtype):
    x = torch.rand(1, 3, 32, 32).to(dtype)
    for rho in (1.4, 12.0):
        y = blur(x, "disk", rho)
        assert y.dtype == dtype and y.shape == x.shape
        ref = blur(x.double(), "disk", rho)
        assert (y.double() - ref).abs().max() < 1e-2


def test_bad_kind_and_radius_raise():
    with pytest.raises(ValueError, match="unknown PSF kind"):
        psf_kernel("airy", 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        psf_kernel("disk", -1.0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        blur(torch.rand(3, 8, 8), "disk", 1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rho", [0.0, 1.4, 3.0, 12.0])
@pytest.mark.parametrize("kind", ["disk", "gaussian"])
def test_cuda_blur_equals_cpu(kind, rho):
    x = torch.rand(2, 3, 64, 64)
    cpu = blur(x, kind, rho)
    gpu = blur(x.cuda(), kind, rho)
    assert gpu.device.type == "cuda" and gpu.dtype == x.dtype
    assert (gpu.cpu() - cpu).abs().max() < 1e-5
    for f in (blur_direct, blur_fft):
        assert (f(x.cuda(), kind, rho).cpu() - f(x, kind, rho)).abs().max() < 1e-5
