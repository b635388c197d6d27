"""Fréchet distance (FID) and kernel distance (KID) between two sets of features, in float64.

References and tolerances (tests/eval/test_fid.py): both equal torchmetrics' ``FrechetInceptionDistance`` /
``KernelInceptionDistance`` fed the same features within 1e-4 relative; FID also equals pytorch-fid's
``calculate_frechet_distance``; FID of a set against itself is 0 to 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fixative.core.errors import FixativeError


@dataclass
class GaussianStats:
    mean: torch.Tensor  # (d,) float64
    covariance: torch.Tensor  # (d, d) float64, unbiased (n - 1)
    count: int


def gaussian_stats(features: torch.Tensor) -> GaussianStats:
    """Mean and unbiased covariance of features (n, d), in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise FixativeError(f"FID needs at least 2 feature vectors, got shape {tuple(features.shape)}")
    features = features.double()
    mean = features.mean(0)
    centred = features - mean
    return GaussianStats(mean, centred.T @ centred / (features.shape[0] - 1), features.shape[0])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by its eigendecomposition (negative
    eigenvalues from rounding are clamped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """d² = ||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)  (Heusel et al. 2017, eq. 6).

    Tr (Σ_a Σ_b)^½ = Tr (Σ_a^½ Σ_b Σ_a^½)^½ = ||Σ_b^½ Σ_a^½||_*, the sum of its singular values, since
    (Σ_b^½ Σ_a^½)ᵀ (Σ_b^½ Σ_a^½) = Σ_a^½ Σ_b Σ_a^½: symmetric-eigen square roots, no complex parts
    (unlike a general ``sqrtm`` of Σ_a Σ_b), and no square root of rounding noise where the covariances
    are rank-deficient (fewer images than feature dimensions).
    """
    trace_sqrt = torch.linalg.svdvals(_psd_sqrt(b.covariance) @ _psd_sqrt(a.covariance)).sum()
    distance = (a.mean - b.mean).square().sum() + a.covariance.trace() + b.covariance.trace() - 2 * trace_sqrt
    return float(distance)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets (n, d) and (m, d).

    With fewer images than dimensions (min(n, m) <= d) the trace term is computed in sample space, exactly:
    with centred features X (n, d), Y (m, d), Σ_a Σ_b = Xᵀ X Yᵀ Y / ((n−1)(m−1)) has the non-zero eigenvalues of
    (X Yᵀ)(X Yᵀ)ᵀ / ((n−1)(m−1)), so Tr (Σ_a Σ_b)^½ = ||X Yᵀ||_* / √((n−1)(m−1)): an n x m problem instead of
    two d x d eigendecompositions (d = 2048 for Inception).
    """
    a, b = gaussian_stats(real), gaussian_stats(fake)
    if min(a.count, b.count) > real.shape[1]:
        return frechet_distance(a, b)
    x, y = real.double() - a.mean, fake.double() - b.mean
    trace_sqrt = torch.linalg.svdvals(x @ y.T).sum() / ((a.count - 1) * (b.count - 1)) ** 0.5
    distance = (a.mean - b.mean).square().sum() + a.covariance.trace() + b.covariance.trace() - 2 * trace_sqrt
    return float(distance)


@dataclass
class KIDResult:
    mean: float
    std: float  # over subsets (population standard deviation, as torchmetrics reports)
    subsets: int
    subset_size: int


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef: float) -> torch.Tensor:
    return (x @ y.T * gamma + coef) ** degree  # k(x, y) = (γ xᵀy + c)^degree


def kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
) -> KIDResult:
    """Kernel Inception Distance (Bińkowski et al. 2018, eq. 3): the unbiased estimate of MMD² with the
    polynomial kernel (γ = 1/d by default), averaged over ``subsets`` random subsets of ``subset_size``
    drawn without replacement. Subsets come from ``torch.Generator().manual_seed(seed)``, drawn as torchmetrics
    draws them from the global generator (a permutation of the real set, then of the fake set, per subset)."""
    real, fake = real.double(), fake.double()
    if min(len(real), len(fake)) < subset_size:
        raise FixativeError(
            f"KID subset size {subset_size} exceeds the number of images "
            f"({len(real)} real, {len(fake)} generated); lower --subset-size"
        )
    if subset_size < 2:
        raise FixativeError("KID needs a subset size of at least 2")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    generator = torch.Generator().manual_seed(seed)
    m = subset_size
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=generator)[:m]]
        y = fake[torch.randperm(len(fake), generator=generator)[:m]]
        k_xx = _polynomial_kernel(x, x, degree, gamma, coef)
        k_yy = _polynomial_kernel(y, y, degree, gamma, coef)
        k_xy = _polynomial_kernel(x, y, degree, gamma, coef)
        # MMD²_u = Σ_{i≠j} k(x_i, x_j) / m(m−1) + Σ_{i≠j} k(y_i, y_j) / m(m−1) − 2 Σ_{i,j} k(x_i, y_j) / m²
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        values.append(within - 2 * k_xy.sum() / m**2)
    values = torch.stack(values)
    return KIDResult(float(values.mean()), float(values.std(unbiased=False)), subsets, subset_size)
