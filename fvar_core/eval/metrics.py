"""Image-quality metrics: FID, IS, KID, precision/recall on feature arrays; PSNR, SSIM on pixels (docs/design.md §9, docs/var-compat.md §4).

Everything here is a pure function of numpy arrays; where the features come from is
`features.py`. The definitions follow the protocol VAR's numbers use — OpenAI's ADM evaluator
(guided-diffusion `evaluations/evaluator.py`) — and torch-fidelity where ADM has no metric:

FID   ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½ on Inception pool3 (2048-d) mean/covariance
      (covariance with N − 1), all in float64; the square root is `scipy.linalg.sqrtm` of the
      product, as in ADM/TTUR. If it is not finite (singular product) ε = 1e-6 is added to both
      diagonals and it is recomputed; a complex result whose diagonal has an imaginary part above
      1e-3 is an error, a smaller one is rounding and dropped. Not clamped at 0 (a set against
      itself gives ≈ 0, possibly −1e-10).
IS    exp(E_x KL(p(y|x) ‖ p(y))) from softmax(pool3 · W) — the classifier *without* its bias
      (torch-fidelity's `logits_unbiased`, ADM's `softmax/logits/MatMul`) — over 1008 classes,
      computed on `splits` disjoint chunks of a fixed-seed permutation of the samples; mean and
      (population) std over chunks. A fixed permutation, not ADM's file order, because samples
      written class by class would otherwise put one class in each chunk.
KID   unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³ on pool3, averaged
      over `subsets` random subsets of `subset_size` from each set (without replacement, drawn from
      numpy's RandomState(seed)); mean and std over subsets (Bińkowski et al. 2018, torch-fidelity).
P/R   improved precision and recall (Kynkäänniemi et al. 2019) with ADM's settings: k = 3. The
      radius r(a) of a feature a of a set A is its squared Euclidean distance to the k-th nearest
      *other* member of A (the (k+1)-th smallest distance counting a itself, as ADM's partition
      at index k does). A point b lies in the manifold of A iff d²(b, a) ≤ r(a) for some a ∈ A.
      precision = fraction of *samples* in the manifold of the reference set;
      recall    = fraction of *reference* features in the manifold of the samples.
      Distances in float32 (ADM: float16, float32 when that overflows).
PSNR  10·log10(1 / MSE) per image on [0, 1] pixels, averaged over images.
SSIM  Wang et al. 2004: 11×11 Gaussian window σ = 1.5, K₁ = 0.01, K₂ = 0.03, data range 1,
      'valid' filtering, per channel, mean over the map, channels and images.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from fvar_core.errors import UserError

FID_EPS = 1e-6
FID_IMAG_TOL = 1e-3
IS_SPLITS = 10
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3
SEED = 2020  # torch-fidelity's default rng_seed: IS permutation and KID subsets


# ------------------------------------------------------------------------------------------ FID
def mean_cov(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, D) features → μ (D,), Σ (D, D), both float64; Σ with the N − 1 normalisation."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise UserError(f"a covariance needs at least 2 images, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class RunningStats:
    """Mean and covariance of features seen in batches, in float64, without keeping them.

    Sums are taken around the first batch's mean (the shifted-data algorithm), so the
    E[xxᵀ] − μμᵀ cancellation costs nothing measurable; equals `mean_cov` of the concatenation.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: Optional[np.ndarray] = None
        self._s1: Optional[np.ndarray] = None
        self._s2: Optional[np.ndarray] = None

    def update(self, features: np.ndarray) -> None:
        """features (B, D)."""
        f = np.asarray(features, dtype=np.float64)
        if self._shift is None:
            self._shift = f.mean(axis=0)
            self._s1 = np.zeros_like(self._shift)
            self._s2 = np.zeros((f.shape[1], f.shape[1]))
        c = f - self._shift
        self._s1 += c.sum(axis=0)
        self._s2 += c.T @ c
        self.n += f.shape[0]

    def state(self) -> Dict[str, np.ndarray]:
        """The sums as arrays (to cache them); `from_state` restores them."""
        return {"n": np.array(self.n), "shift": self._shift, "s1": self._s1, "s2": self._s2}

    @classmethod
    def from_state(cls, state: Dict[str, np.ndarray]) -> "RunningStats":
        out = cls()
        out.n, out._shift, out._s1, out._s2 = int(state["n"]), state["shift"], state["s1"], state["s2"]
        return out

    def mean_cov(self) -> Tuple[np.ndarray, np.ndarray]:
        """μ (D,), Σ (D, D) with the N − 1 normalisation."""
        if self.n < 2:
            raise UserError(f"a covariance needs at least 2 images, got {self.n}")
        m = self._s1 / self.n
        cov = (self._s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return self._shift + m, (cov + cov.T) / 2


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """FID between two Gaussians N(μ₁, Σ₁), N(μ₂, Σ₂): μ (D,), Σ (D, D); see the module docstring."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise UserError(f"FID statistics do not match: mean {mu1.shape} / {mu2.shape}, "
                        f"covariance {s1.shape} / {s2.shape} (different feature extractors?)")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns on a singular product; that case is the expected one with fewer images than
        # dimensions and is handled below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            # Not finite: regularise as ADM does.
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > FID_IMAG_TOL:
            raise UserError(f"FID: the square root of the covariance product is complex (imaginary part "
                            f"{imag:.3g} > {FID_IMAG_TOL:g}); the statistics are degenerate (too few images?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ------------------------------------------------------------------------------------------- IS
def inception_score(logits: np.ndarray, splits: int = IS_SPLITS, seed: int = SEED) -> Tuple[float, float]:
    """(N, C) classifier logits (no bias) → (IS mean, IS std) over min(splits, N) chunks."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = lg.shape[0]
    if lg.ndim != 2 or n < 1:
        raise UserError(f"the Inception score needs at least one image (logits of shape {tuple(lg.shape)})")
    lg = lg[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    p, log_p = lg.softmax(dim=1), lg.log_softmax(dim=1)
    splits = max(1, min(splits, n))
    scores = []
    for i in range(splits):
        a, b = i * n // splits, (i + 1) * n // splits
        py = p[a:b].mean(dim=0, keepdim=True)  # marginal p(y) of the chunk
        kl = (p[a:b] * (log_p[a:b] - py.log())).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------ KID
def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx: np.ndarray, kxy: np.ndarray, kyy: np.ndarray) -> float:
    """Unbiased MMD² of two m-sets: within-set sums without the diagonal over m(m−1), cross over m²."""
    m = kxx.shape[0]
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(fake: np.ndarray, real: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = SEED) -> Dict[str, float]:
    """fake (N₁, D), real (N₂, D) → {mean, std, subset_size, subsets}; the subset size is capped at
    min(N₁, N₂) (the cap is reported, since KID's variance depends on it)."""
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    m = min(subset_size, len(fake), len(real))
    if m < 2:
        raise UserError(f"KID needs at least 2 images in each set (samples {len(fake)}, reference {len(real)})")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        f = fake[rng.choice(len(fake), m, replace=False)]
        r = real[rng.choice(len(real), m, replace=False)]
        mmds[i] = _mmd2_unbiased(_poly_kernel(f, f), _poly_kernel(f, r), _poly_kernel(r, r))
    return {"mean": float(mmds.mean()), "std": float(mmds.std()), "subset_size": m, "subsets": subsets}


# ------------------------------------------------------------------------ precision and recall
def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) → (n, m) squared Euclidean distances, clamped at 0 (matmul form, as ADM)."""
    d = a.pow(2).sum(1, keepdim=True) - 2.0 * a @ b.T + b.pow(2).sum(1)[None]
    return d.clamp_(min=0.0)


def manifold_radii(feats: torch.Tensor, k: int = PR_K, block: int = 4096) -> torch.Tensor:
    """(N, D) → (N,) squared distance of each feature to its k-th nearest other feature."""
    n = feats.shape[0]
    if n < k + 1:
        raise UserError(f"precision/recall with k = {k} need at least {k + 1} images per set, got {n}")
    out = torch.empty(n, dtype=feats.dtype, device=feats.device)
    for s in range(0, n, block):
        # index k of the sorted row: index 0 is the feature itself (distance 0)
        out[s:s + block] = _sq_dists(feats[s:s + block], feats).kthvalue(k + 1, dim=1).values
    return out


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Fraction of `points` inside at least one ball (centre, squared radius)."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for s in range(0, points.shape[0], block):
        p = points[s:s + block]
        hit = torch.zeros(p.shape[0], dtype=torch.bool, device=points.device)
        for c in range(0, centres.shape[0], block):
            hit |= (_sq_dists(p, centres[c:c + block]) <= radii[c:c + block][None]).any(dim=1)
        inside[s:s + block] = hit
    return float(inside.float().mean())


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = PR_K, device: Optional[torch.device] = None,
                     block: int = 4096) -> Tuple[float, float]:
    """fake (N₁, D) samples, real (N₂, D) reference → (precision, recall); see the module docstring."""
    dev = device or torch.device("cpu")
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=dev)
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=dev)
    r_fake, r_real = manifold_radii(f, k, block), manifold_radii(r, k, block)
    return _coverage(f, r, r_real, block), _coverage(r, f, r_fake, block)


# ------------------------------------------------------------------------------ reconstruction
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pairs in [0, 1] → (B,) PSNR in dB (inf for identical images)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (size, size), sums to 1


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(B, C, H, W) pairs in [0, 1] (H, W ≥ window) → (B,) mean SSIM (Wang et al. 2004)."""
    x, y = x.double(), y.double()
    c = x.shape[1]
    w = _gaussian_window(window, sigma).to(x.device).expand(c, 1, window, window)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, w, groups=c)  # 'valid', per channel

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
