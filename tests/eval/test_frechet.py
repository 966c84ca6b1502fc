"""Feature statistics and the Frechet distance: against a float64 closed form, scipy's sqrtm, torchmetrics' FID on
the same features, and mergeable across batches/ranks; reference stats files refuse another extractor/resolution."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from pipeline.errors import ConfigError
from pipeline.eval.frechet import (FeatureStats, ReferenceStats, frechet_distance, frechet_from_stats,
                                   load_reference_stats)


def _random_orthogonal(dim: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return q


def test_equals_closed_form_for_gaussians_sharing_eigenvectors():
    # cov1 = Q diag(a) Q^T and cov2 = Q diag(b) Q^T commute:
    # Tr(cov1 + cov2 - 2 (cov1 cov2)^1/2) = sum (sqrt a - sqrt b)^2
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    dim = 24
    q = _random_orthogonal(dim, g)
    a = torch.rand(dim, generator=g, dtype=torch.float64) * 3 + 0.01
    b = torch.rand(dim, generator=g, dtype=torch.float64) * 3 + 0.01
    mu1, mu2 = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu1, q @ torch.diag(a) @ q.T) == pytest.approx(0, abs=1e-9)


def test_sample_statistics_match_scipy_sqrtm_in_float64():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    dim, n = 16, 400
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g, dtype=torch.float64)
    y = torch.randn(n, dim, generator=g, dtype=torch.float64) * 1.5 + 0.3
    sx, sy = FeatureStats.of(x), FeatureStats.of(y)
    assert torch.allclose(sx.covariance(), torch.from_numpy(np.cov(x.numpy(), rowvar=False)), atol=1e-10)
    c1, c2 = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    expected = float(((x.mean(0) - y.mean(0)).numpy() ** 2).sum() + np.trace(c1 + c2 - 2 * root))
    assert frechet_from_stats(sx, sy) == pytest.approx(expected, rel=1e-6)


class _Features(nn.Module):
    """Identity 'extractor' so torchmetrics' FID runs on the features we give it."""

    num_features = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_equals_torchmetrics_fid_on_the_same_features():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    real = torch.randn(300, 12, generator=g, dtype=torch.float64)
    fake = torch.randn(200, 12, generator=g, dtype=torch.float64) * 0.8 + 0.2 * torch.randn(12, generator=g)
    metric = FrechetInceptionDistance(feature=_Features())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    ours = frechet_from_stats(FeatureStats.of(real), FeatureStats.of(fake))
    assert theirs > 0.1
    # both in float64; they take the eigenvalues of the non-symmetric cov1 cov2, we of a symmetric similar matrix
    assert ours == pytest.approx(theirs, rel=1e-8)


def test_statistics_merge_exactly_across_batches_and_ranks():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    x = torch.randn(37, 8, generator=g) * 3 + 1
    whole = FeatureStats.of(x)
    parts = FeatureStats.of(x[:10]).merged(FeatureStats.of(x[10:25])).merged(FeatureStats.of(x[25:]))
    assert parts.count == 37
    assert torch.allclose(parts.covariance(), whole.covariance(), rtol=1e-12, atol=1e-12)
    summed = FeatureStats.of(x[:20]).flat() + FeatureStats.of(x[20:]).flat()  # what an all-reduce does
    back = FeatureStats.from_flat(summed, 8)
    assert back.count == 37 and torch.allclose(back.mean(), whole.mean(), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.of(x[:1]).covariance()


def test_reference_stats_round_trip_and_refuse_another_extractor_or_resolution(tmp_path):
    stats = FeatureStats.of(torch.randn(20, 4, dtype=torch.float64))
    path = tmp_path / "stats.npz"
    ReferenceStats.from_stats(stats, "abc123", 64).save(path)
    loaded = load_reference_stats(path, "abc123", 64)
    assert loaded.count == 20 and np.allclose(loaded.covariance, stats.covariance().numpy())
    with pytest.raises(ConfigError, match="feature extractor"):
        load_reference_stats(path, "other", 64)
    with pytest.raises(ConfigError, match="resolution 64"):
        load_reference_stats(path, "abc123", 32)
    with pytest.raises(ConfigError, match="does not exist"):
        load_reference_stats(tmp_path / "missing.npz", "abc123", 64)
    (tmp_path / "bad.npz").write_bytes(b"not a stats file")
    with pytest.raises(ConfigError, match="not a stats file") as info:
        load_reference_stats(tmp_path / "bad.npz", "abc123", 64)
    assert "\n" not in str(info.value)
