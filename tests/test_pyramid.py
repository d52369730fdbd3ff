"""Radius schedules, dual-path views D/L/A, the built-in test images and the pyramid figure."""
import math

import pytest
import torch
from PIL import Image

from fvar_core.config import PyramidConfig
from fvar_core.errors import UserError
from fvar_core.focus.figure import nice_gain, pyramid_figure
from fvar_core.focus.psf import blur
from fvar_core.focus.pyramid import PyramidViews, area_down, focus_images, focus_views
from fvar_core.focus.schedules import betas, radii, view_sizes
from fvar_core.focus.testimages import BUILTIN_IMAGES, resolution_chart, zone_plate

PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_TINY = (1, 2, 4)  # 64px at 16 px per cell


# --- schedules ---------------------------------------------------------------------------------

def test_view_sizes_are_token_grid_footprints():
    assert view_sizes(PN, 256) == [16, 32, 48, 64, 80, 96, 128, 160, 208, 256]


def test_cosine_schedule_runs_from_rho_max_to_zero_strictly_decreasing():
    r = radii("cosine", 12.0, PN, 256)
    assert len(r) == len(PN)
    assert r[0] == 12.0 and r[-1] == 0.0
    assert all(a > b for a, b in zip(r, r[1:]))
    # docs/design.md §4: the corrected Eq. 2, ρ_k = ρ_max (1 + cos(π (k−1)/(K−1))) / 2.
    assert r[6] == pytest.approx(3.0) and r[7] == pytest.approx(12 * (1 + math.cos(7 * math.pi / 9)) / 2)


def test_linear_schedule():
    assert radii("linear", 9.0, PN, 256) == pytest.approx([9 - k for k in range(10)])


def test_matched_schedule_puts_disk_zero_at_view_nyquist_and_ends_at_zero():
    r = radii("matched", 12.0, PN, 256)
    assert r[-1] == 0.0 and r[0] == 12.0  # 1.2196·16 = 19.5 is capped
    assert all(a >= b for a, b in zip(r, r[1:]))
    for rho, v in zip(r[1:-1], view_sizes(PN, 256)[1:-1]):
        assert 0.6098 / rho == pytest.approx(v / (2 * 256), rel=1e-4)  # first zero = output Nyquist


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="unknown radius schedule"):
        radii("exp", 12.0, PN, 256)


def test_betas_are_linear():
    assert betas(1e-3, 1e-2, 10) == pytest.approx([1e-3 * (k + 1) for k in range(10)])
    assert betas(0.1, 0.2, 1) == [0.1]


# --- views -------------------------------------------------------------------------------------

def _image(b=1, dtype=torch.float64, n=64, seed=0):
    return torch.rand(b, 3, n, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_views_have_expected_sizes_and_radii():
    v = focus_views(_image(), PyramidConfig(rho_max=3.0), PN_TINY, 64)
    assert isinstance(v, PyramidViews)
    assert v.sizes == [16, 32, 64]
    assert v.rhos == radii("cosine", 3.0, PN_TINY, 64)
    for views in (v.L, v.D, v.A):
        assert [tuple(t.shape) for t in views] == [(1, 3, s, s) for s in v.sizes]


def test_last_scale_area_view_is_the_image_and_focus_view_too():
    x = _image()
    v = focus_views(x, PyramidConfig(rho_max=3.0), PN_TINY, 64)
    assert torch.equal(v.D[-1], x)
    assert torch.equal(v.L[-1], x)  # ρ_K = 0: identity PSF
    assert torch.equal(v.A[-1], torch.zeros_like(x))


def test_alias_residual_is_area_minus_focus():
    v = focus_views(_image(), PyramidConfig(rho_max=3.0, noise=True), PN_TINY, 64,
                    generator=torch.Generator().manual_seed(0))
    for a, d, l in zip(v.A, v.D, v.L):
        assert torch.equal(a, d - l)


def test_area_kernel_gives_zero_residual():
    v = focus_views(_image(), PyramidConfig(kernel="area"), PN_TINY, 64)
    for a, d, l in zip(v.A, v.D, v.L):
        assert torch.equal(d, l) and not a.any()


def test_focus_views_are_blurred_area_views():
    v = focus_views(_image(), PyramidConfig(rho_max=3.0), PN_TINY, 64)
    assert (v.A[0].abs().max() > 1e-3) and (v.L[0].std() < v.D[0].std())


def test_noise_is_reproducible_with_a_seeded_generator_and_absent_when_off():
    x = _image()
    cfg = PyramidConfig(rho_max=3.0, noise=True, beta_start=0.1, beta_end=0.2)
    a = focus_images(x, cfg, PN_TINY, 64, generator=torch.Generator().manual_seed(7))
    b = focus_images(x, cfg, PN_TINY, 64, generator=torch.Generator().manual_seed(7))
    quiet = focus_images(x, cfg.model_copy(update={"noise": False}), PN_TINY, 64,
                         generator=torch.Generator().manual_seed(7))
    clean = focus_images(x, cfg.model_copy(update={"noise": False}), PN_TINY, 64)
    rhos = radii("cosine", 3.0, PN_TINY, 64)
    for la, lb, lq, lc, beta, rho in zip(a, b, quiet, clean, betas(0.1, 0.2, 3), rhos):
        assert torch.equal(la, lb)
        assert torch.equal(lq, lc)
        if rho >= 0.5:
            assert (la - lq).std().item() == pytest.approx(beta, rel=0.25)  # ε ~ N(0, 1) scaled by β_k
        else:
            assert la is x and lq is x  # the sharp view is x itself, never noised (z_K = E(x) exactly)
    # the views are those images, area-downsampled; noise never touches the area path
    views = focus_views(x, cfg, PN_TINY, 64, generator=torch.Generator().manual_seed(7))
    for f, l, v in zip(a, views.L, views.sizes):
        assert torch.equal(l, area_down(f, v))
    for da, dq in zip(views.D, focus_views(x, cfg.model_copy(update={"noise": False}), PN_TINY, 64).D):
        assert torch.equal(da, dq)


def test_equal_radii_share_one_focus_image_without_noise():
    pn = (1, 2, 4, 8, 16)  # matched schedule capped at ρ_max: several scales at the same radius
    cfg = PyramidConfig(schedule="matched", rho_max=2.0)
    x = _image(n=64)
    views = focus_images(x, cfg, pn, 64)
    rhos = radii("matched", 2.0, pn, 64)
    for i in range(len(pn)):
        for j in range(len(pn)):
            assert (views[i] is views[j]) == (rhos[i] == rhos[j] or (rhos[i] < 0.5 and rhos[j] < 0.5))
    assert sum(r == 2.0 for r in rhos) >= 2
    noisy = focus_images(x, cfg.model_copy(update={"noise": True}), pn, 64)
    assert noisy[0] is not noisy[1]  # each noisy view draws its own ε


def test_latent_focus_images_measure_radii_in_grid_cells():
    f = _image(n=8)  # a latent grid of 8×8 cells
    cfg = PyramidConfig(rho_max=1.5, space="latent")
    zs = focus_images(f, cfg, (1, 2, 4, 8), 8)
    rhos = radii("cosine", 1.5, (1, 2, 4, 8), 8)
    for z, rho in zip(zs, rhos):
        assert (z is f) == (rho < 0.5)
        if rho >= 0.5:
            assert torch.equal(z, blur(f, "disk", rho))


def test_batched_views_match_per_image_views():
    x = _image(b=3)
    cfg = PyramidConfig(rho_max=3.0)
    batch = focus_views(x, cfg, PN_TINY, 64)
    for i in range(3):
        single = focus_views(x[i:i + 1], cfg, PN_TINY, 64)
        for lb, ls in zip(batch.L, single.L):
            assert torch.allclose(lb[i:i + 1], ls, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_keep_dtype(dtype):
    x = _image(b=2, dtype=dtype)
    v = focus_views(x, PyramidConfig(rho_max=6.0), PN_TINY, 64)
    ref = focus_views(x.double(), PyramidConfig(rho_max=6.0), PN_TINY, 64)
    for l, lr in zip(v.L, ref.L):
        assert l.dtype == dtype
        assert (l.double() - lr).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_wrong_size_input_raises():
    with pytest.raises(ValueError, match="64×64"):
        focus_views(_image(n=32), PyramidConfig(), PN_TINY, 64)
    with pytest.raises(ValueError, match="B, C, H, W"):
        focus_views(_image()[0], PyramidConfig(), PN_TINY, 64)


def test_latent_space_has_no_pixel_views():
    with pytest.raises(UserError, match="latent"):
        focus_views(_image(), PyramidConfig(space="latent"), PN_TINY, 64)


# --- test images -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zone-plate", "chart"])
@pytest.mark.parametrize("n", [64, 256])
def test_builtin_images_are_float32_rgb_in_unit_range(name, n):
    t = BUILTIN_IMAGES[name](n)
    assert t.shape == (3, n, n) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0 and float(t.std()) > 0.1


def test_zone_plate_is_the_design_formula():
    n = 256
    z = zone_plate(n)
    assert torch.equal(z[0], z[1]) and torch.equal(z[0], z[2])
    c = torch.arange(n, dtype=torch.float64) - n / 2 + 0.5
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    w = 0.5 + 0.5 * torch.cos(math.pi * torch.clamp((r - (n / 2 - 8)) / 8, 0, 1))
    ref = 0.5 + 0.5 * torch.cos(math.pi * r ** 2 / n) * w
    assert (z[0].double() - ref).abs().max() < 1e-6
    assert float(z[0, 0, 0]) == pytest.approx(0.5, abs=1e-6)  # corners tapered to mid-grey


def test_chart_has_hard_edges():
    t = resolution_chart(256)[0]
    # Mostly the two ink levels: sharp edges, not anti-aliased ramps.
    two_levels = ((t - 15 / 255).abs() < 1e-6) | ((t - 235 / 255).abs() < 1e-6)
    assert two_levels.float().mean() > 0.97


# --- figure ------------------------------------------------------------------------------------

def test_figure_is_rgb_with_one_column_per_scale():
    v = focus_views(zone_plate(64)[None], PyramidConfig(rho_max=3.0), PN_TINY, 64)
    small = pyramid_figure(v, title="zone plate", cell=48)
    big = pyramid_figure(v, title="zone plate", cell=96)
    assert isinstance(small, Image.Image) and small.mode == "RGB"
    assert big.width - small.width == 3 * (96 - 48)  # 3 scales → 3 columns
    assert big.height - small.height == 3 * (96 - 48)  # rows D, L, A
    assert 3 * 48 < small.width < 3 * 48 + 300 and 3 * 48 < small.height < 3 * 48 + 200


def test_full_figure_stays_a_sane_size():
    x = zone_plate(256)[None]
    fig = pyramid_figure(focus_views(x, PyramidConfig(), PN, 256), title="t")
    assert fig.mode == "RGB" and fig.width <= 10 * 160 + 300 and fig.height <= 3 * 160 + 200


def test_nice_gain_is_a_round_number_that_fits():
    assert nice_gain(0.3) == 1.0
    assert nice_gain(0.05) == 10.0
    assert nice_gain(0.011) == 20.0
    assert nice_gain(1.0) == 0.5
    assert nice_gain(0.0) == 1.0
    for p in (0.0123, 0.27, 3.3):
        assert nice_gain(p) * p <= 0.5 + 1e-12
