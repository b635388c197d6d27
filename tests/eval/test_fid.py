"""FID and KID against torchmetrics (and pytorch-fid) on the same features."""

import pytest
import torch

from fixative.core.errors import FixativeError
from fixative.eval.fid import fid, gaussian_stats, kid


class Identity(torch.nn.Module):
    """A 'feature extractor' handing torchmetrics the features themselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features):
        return features


def features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=generator, dtype=torch.float64) @ mixing + shift


@pytest.mark.parametrize("n", [200, 20])
def test_fid_of_a_set_against_itself_is_zero(n):
    real = features(n, 64, 0)
    assert abs(fid(real, real)) < 1e-6


@pytest.mark.parametrize("n, d", [(300, 32), (50, 64)])  # full-rank and rank-deficient covariances
def test_fid_equals_torchmetrics_and_pytorch_fid(n, d):
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = features(n, d, 0), features(n + 7, d, 1, shift=0.3)
    metric = FrechetInceptionDistance(feature=Identity(d)).set_dtype(torch.float64)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    ours = fid(real, fake)
    assert ours == pytest.approx(expected, rel=1e-4)
    a, b = gaussian_stats(real), gaussian_stats(fake)
    reference = calculate_frechet_distance(a.mean.numpy(), a.covariance.numpy(), b.mean.numpy(), b.covariance.numpy())
    assert ours == pytest.approx(reference, rel=1e-4)


def test_sample_space_and_feature_space_routes_agree():
    from fixative.eval.fid import frechet_distance

    real, fake = features(40, 64, 0), features(30, 64, 1, shift=0.2)  # rank-deficient: the sample-space route
    assert fid(real, fake) == pytest.approx(frechet_distance(gaussian_stats(real), gaussian_stats(fake)), rel=1e-6)


def test_kid_equals_torchmetrics_with_the_same_subsets():
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = features(120, 32, 0), features(100, 32, 1, shift=0.2)
    metric = KernelInceptionDistance(feature=Identity(32), subsets=5, subset_size=40)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(3)  # torchmetrics draws its subsets from the global generator
    mean, std = metric.compute()
    ours = kid(real, fake, subsets=5, subset_size=40, seed=3)
    assert ours.mean == pytest.approx(float(mean), rel=1e-4)
    assert ours.std == pytest.approx(float(std), rel=1e-4)


def test_kid_is_deterministic_for_a_seed_and_depends_on_it():
    real, fake = features(80, 16, 0), features(80, 16, 1, shift=0.1)
    first = kid(real, fake, subsets=4, subset_size=30, seed=7)
    again = kid(real, fake, subsets=4, subset_size=30, seed=7)
    assert first == again
    assert kid(real, fake, subsets=4, subset_size=30, seed=8).mean != first.mean


def test_kid_with_the_whole_sets_as_one_subset_is_the_unbiased_mmd():
    real, fake = features(20, 8, 0), features(20, 8, 1, shift=0.5)

    def k(x, y):
        return (x @ y.T / 8 + 1) ** 3

    m = 20
    by_hand = (
        (k(real, real).sum() - k(real, real).trace()) / (m * (m - 1))
        + (k(fake, fake).sum() - k(fake, fake).trace()) / (m * (m - 1))
        - 2 * k(real, fake).mean()
    )
    assert kid(real, fake, subsets=1, subset_size=20).mean == pytest.approx(float(by_hand), rel=1e-10)


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(FixativeError, match="at least 2"):
        fid(features(1, 4, 0), features(5, 4, 1))
    with pytest.raises(FixativeError, match="subset size"):
        kid(features(10, 4, 0), features(10, 4, 1), subset_size=50)
