"""The metric definitions of fvar_core.eval.metrics against closed forms, an independent float64 scipy
computation, constructed sets with known answers, and torch-fidelity's own implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import linalg

from fvar_core.errors import UserError
from fvar_core.eval.metrics import (RunningStats, frechet_distance, inception_score, kernel_inception_distance,
                               mean_cov, precision_recall, psnr, ssim)


def _gaussian_features(rng, n, d, shift=0.0, scale=1.0):
    a = rng.normal(size=(d, d)) / math.sqrt(d)
    return (rng.normal(size=(n, d)) @ a) * scale + shift


def _independent_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID in float64 with scipy, by another route: the symmetric form tr (Σ₁^½ Σ₂ Σ₁^½)^½."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r1 = linalg.sqrtm(s1).real
    inner = linalg.sqrtm(r1 @ s2 @ r1).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(inner))


def test_fid_matches_independent_float64_scipy_on_gaussian_features():
    rng = np.random.default_rng(0)
    x = _gaussian_features(rng, 2000, 64)
    y = _gaussian_features(rng, 2000, 64, shift=0.3, scale=1.2)
    ours = frechet_distance(*mean_cov(x), *mean_cov(y))
    assert ours == pytest.approx(_independent_fid(x, y), rel=1e-6)
    assert ours > 1.0


def test_fid_closed_form_for_diagonal_gaussians():
    # FID = |μ₁ − μ₂|² + Σ (√a_i − √b_i)² when both covariances are diagonal
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    want = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_fid_of_a_set_against_itself_is_zero():
    x = _gaussian_features(np.random.default_rng(1), 500, 32)
    mu, sigma = mean_cov(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fid_with_fewer_images_than_dimensions_is_finite_and_right():
    # rank-deficient covariances: the product is singular (the evaluation of 8 images in 2048-d)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 64)), rng.normal(size=(8, 64)) + 0.5
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ours = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    # eigenvalues of Σ₁Σ₂ are real and ≥ 0 in exact arithmetic: tr √ = Σ √λ
    tr = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    want = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert math.isfinite(ours) and ours == pytest.approx(want, rel=1e-5)


def test_fid_agrees_with_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    x, y = _gaussian_features(rng, 400, 48), _gaussian_features(rng, 400, 48, shift=0.1)
    (m1, s1), (m2, s2) = mean_cov(x), mean_cov(y)
    tf = fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, verbose=False)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)


def test_fid_of_mismatched_statistics_is_a_user_error():
    with pytest.raises(UserError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_stats_equal_mean_and_covariance_of_the_concatenation():
    x = _gaussian_features(np.random.default_rng(4), 301, 16, shift=40.0)
    rs = RunningStats()
    for s in range(0, len(x), 37):
        rs.update(x[s:s + 37])
    (m1, c1), (m2, c2) = rs.mean_cov(), mean_cov(x)
    np.testing.assert_allclose(m1, m2, rtol=1e-12)
    np.testing.assert_allclose(c1, c2, rtol=1e-9, atol=1e-12)
    back = RunningStats.from_state(rs.state())
    np.testing.assert_array_equal(back.mean_cov()[1], c1)


def test_inception_score_known_values():
    n, c = 40, 10
    assert inception_score(np.zeros((n, c)))[0] == pytest.approx(1.0)  # p(y|x) = p(y): no information
    confident = np.full((n, c), -1e4)
    confident[np.arange(n), np.arange(n) % c] = 0.0  # one sure class per image, all classes equally often
    mean, _ = inception_score(confident, splits=1)
    assert mean == pytest.approx(c, rel=1e-9)


def test_inception_score_agrees_with_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(5).normal(size=(200, 1008)) * 3
    tf = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits)
    assert mean == pytest.approx(tf["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(tf["inception_score_std"], rel=1e-6)


def test_kid_agrees_with_torch_fidelity_and_is_zero_in_expectation_for_one_distribution():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(120, 32)), rng.normal(size=(150, 32)) + 0.4
    ours = kernel_inception_distance(x, y, subsets=20, subset_size=50)
    tf = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=20, kid_subset_size=50,
                                kid_degree=3, kid_gamma=None, kid_coef0=1, kid_kernel="poly", verbose=False,
                                rng_seed=2020)
    assert ours["mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-9)
    assert ours["std"] == pytest.approx(tf["kernel_inception_distance_std"], rel=1e-6)
    same = kernel_inception_distance(x[:60], x[60:], subsets=20, subset_size=50)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3 and ours["mean"] > 10 * abs(same["mean"])
    assert kernel_inception_distance(x, y[:7])["subset_size"] == 7  # capped at the smaller set


def test_precision_recall_on_a_constructed_line():
    # Reference: x = 0..9 on a line. k = 3 radii: 2 inside, 3 at both ends.
    real = np.stack([np.arange(10.0), np.zeros(10)], 1)
    # Samples: 5 on the line at 0.5..4.5 (inside reference balls), 5 far away (y = 100).
    fake = np.concatenate([np.stack([np.arange(5) + 0.5, np.zeros(5)], 1),
                           np.stack([np.arange(5.0), np.full(5, 100.0)], 1)])
    p, r = precision_recall(fake, real)
    assert p == pytest.approx(0.5)
    # Sample balls (k = 3 among the samples): 0.5 → 3, 1.5 → 2, 2.5 → 2, 3.5 → 2, 4.5 → 3: they cover
    # [-2.5, 7.5], so reference points 0..7 are recalled, 8 and 9 are not.
    assert r == pytest.approx(0.8)


def test_precision_recall_extremes_and_torch_fidelity_agreement():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    rng = np.random.default_rng(7)
    x = rng.normal(size=(60, 16))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x + 1000.0, x) == (0.0, 0.0)
    y = rng.normal(size=(80, 16)) * 1.3 + 0.5
    tf = calculate_precision_recall_full(torch.from_numpy(y).float(), torch.from_numpy(x).float(), 3)
    ours = precision_recall(y, x)
    assert ours == pytest.approx(tf, abs=1.5 / 80)  # float32 ties aside, the same definition
    with pytest.raises(UserError, match="at least 4"):
        precision_recall(x[:3], x)


def test_psnr_and_ssim_known_values():
    a = torch.full((2, 3, 16, 16), 0.5)
    b = torch.full((2, 3, 16, 16), 0.6)
    assert torch.isinf(psnr(a, a)).all()
    assert psnr(a, b).tolist() == pytest.approx([20.0, 20.0])  # MSE 0.01
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    c1 = 0.01 ** 2  # constant images: only the luminance term is left
    assert ssim(a, b)[0].item() == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1))
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(noise, 1 - noise).item() < 0.0 < ssim(noise, (noise + 0.05).clamp(0, 1)).item() < 1.0
