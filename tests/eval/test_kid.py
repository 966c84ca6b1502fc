"""KID: the unbiased polynomial-kernel MMD against torchmetrics on the same features, a float64 direct sum, and
its behaviour on equal and shifted distributions."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from pipeline.eval.kid import kernel_distance, unbiased_mmd2


class _Features(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _direct_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimator written as explicit loops over pairs (float64)."""
    m, d = x.shape
    k = lambda a, b: float((a @ b / d + 1) ** 3)  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_unbiased_mmd_equals_the_direct_sum():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    x, y = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    assert float(unbiased_mmd2(x, y)) == pytest.approx(_direct_mmd2(x, y), rel=1e-10, abs=1e-12)


def test_equals_torchmetrics_kid_with_one_subset_of_everything():
    # With subset_size = N each subset is a permutation of all rows, so neither side's random draw matters.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    real = torch.randn(50, 16, generator=g, dtype=torch.float64)
    fake = torch.randn(50, 16, generator=g, dtype=torch.float64) + 0.5
    metric = KernelInceptionDistance(feature=_Features(), subsets=1, subset_size=50)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs, _ = metric.compute()
    ours, spread = kernel_distance(real, fake, subsets=3, subset_size=50)
    assert ours == pytest.approx(float(theirs), rel=1e-10)
    assert spread == pytest.approx(0, abs=1e-12)


def test_near_zero_for_one_distribution_and_positive_for_a_shift_and_seeded():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, same_std = kernel_distance(a, b, subsets=20, subset_size=100)
    shifted, _ = kernel_distance(a, b + 0.5, subsets=20, subset_size=100)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * max(abs(same), same_std)
    assert kernel_distance(a, b, subsets=5, subset_size=50, seed=3) == kernel_distance(a, b, subsets=5,
                                                                                       subset_size=50, seed=3)
