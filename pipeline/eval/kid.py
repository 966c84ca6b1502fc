"""Kernel Inception Distance: the unbiased squared MMD with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3,
averaged over random subsets (Binkowski et al. 2018; the estimator torch-fidelity and torchmetrics use).

Subsets are drawn from a seeded generator, so the same gathered features give the same number on any number of
ranks and in any run.
"""
from __future__ import annotations

import torch


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """x (M, D), y (P, D) -> (M, P) kernel matrix (x y^T / D + coef)^degree."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def unbiased_mmd2(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Unbiased squared MMD between two equal-size sets (m, D): the diagonals of k(x, x) and k(y, y) are left out
    (each pair of distinct samples counts once per order), the cross term averages over all m^2 pairs."""
    m = real.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(real, real), polynomial_kernel(fake, fake), polynomial_kernel(real, fake)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets of `subset_size` rows of each set.

    real (N, D), fake (M, D) features (computed in float64); subset_size is capped at min(N, M) so small evaluations
    still answer (with one subset of everything the estimate no longer depends on the draw).
    """
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {real.shape[0]} and {fake.shape[0]}")
    real, fake = real.to("cpu", torch.float64), fake.to("cpu", torch.float64)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        pick_real = torch.randperm(real.shape[0], generator=generator)[:size]
        pick_fake = torch.randperm(fake.shape[0], generator=generator)[:size]
        values.append(unbiased_mmd2(real[pick_real], fake[pick_fake]))
    scores = torch.stack(values)
    return float(scores.mean()), float(scores.std(unbiased=False))
