"""Feature statistics and the Frechet distance between the Gaussians they describe (FID when the features are
Inception-v3 pool features, a "Frechet distance in CLIP space" when they are CLIP image embeddings).

Statistics are kept as sums (count, sum of features, sum of outer products) in float64, the way torchmetrics'
FrechetInceptionDistance keeps them: sums from any number of batches or ranks add exactly (an all-reduce is a
sum), so one rank and N ranks give the same mean and covariance up to the order of float64 additions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import ConfigError


@dataclass
class FeatureStats:
    """Running sums of feature vectors: count N, total (D,) = sum x, outer (D, D) = sum x x^T, all float64."""

    count: int
    total: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        """Statistics of features (N, D)."""
        stats = cls.empty(features.shape[1])
        stats.update(features)
        return stats

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    def update(self, features: torch.Tensor) -> None:
        """Add features (N, D) (any float dtype, any device) to the sums."""
        x = features.detach().to("cpu", torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(features.shape)}")
        self.count += x.shape[0]
        self.total += x.sum(dim=0)
        self.outer += x.T @ x

    def merged(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both sets together."""
        return FeatureStats(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def flat(self) -> torch.Tensor:
        """(1 + D + D*D,) float64: count, total, outer in one tensor, for one all-reduce (sum) across ranks."""
        return torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.total, self.outer.reshape(-1)])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, dim: int) -> FeatureStats:
        flat = flat.to("cpu", torch.float64)
        return cls(int(round(flat[0].item())), flat[1:1 + dim].clone(), flat[1 + dim:].reshape(dim, dim).clone())

    def mean(self) -> torch.Tensor:
        """(D,) float64."""
        return self.total / self.count

    def covariance(self) -> torch.Tensor:
        """(D, D) float64 unbiased sample covariance (divides by N - 1, as torchmetrics and clean-fid do)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.mean()
        return (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite (D, D) matrix (negative rounding clipped)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)) in float64.

    mu: (D,), cov: (D, D). Tr (cov1 cov2)^(1/2) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix cov1^(1/2) cov2 cov1^(1/2) (same spectrum as cov1 cov2): eigh of a symmetric matrix, no
    complex eigenvalues from rounding as with a general eigen-solver or scipy's sqrtm on rank-deficient covariances.
    """
    mu1, mu2, cov1, cov2 = (t.to("cpu", torch.float64) for t in (mu1, mu2, cov1, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return float(value)


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    if a.dim != b.dim:
        raise ValueError(f"feature statistics of different widths: {a.dim} vs {b.dim}")
    return frechet_distance(a.mean(), a.covariance(), b.mean(), b.covariance())


# ----------------------------------------------------------------------------------------- reference files
@dataclass(frozen=True)
class ReferenceStats:
    """Mean and covariance of a reference image set (what ``eval-stats`` writes) and what they were computed with.

    extractor: digest naming the feature extractor (e.g. the Inception weights' sha256); resolution: the side the
    images were resized to before feature extraction (the side the evaluated stage generates).
    """

    mean: np.ndarray
    covariance: np.ndarray
    count: int
    extractor: str
    resolution: int

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mean, sigma=self.covariance, count=np.int64(self.count),
                 extractor=np.str_(self.extractor), resolution=np.int64(self.resolution))

    @classmethod
    def from_stats(cls, stats: FeatureStats, extractor: str, resolution: int) -> ReferenceStats:
        return cls(stats.mean().numpy(), stats.covariance().numpy(), stats.count, extractor, resolution)


def load_reference_stats(path: str | Path, extractor: str, resolution: int, key: str = "eval.fid_stats") -> \
        ReferenceStats:
    """Read a stats file; ConfigError (one line, naming `key`) when it is missing, unreadable, or was computed
    with another feature extractor or at another resolution than the evaluation uses."""
    try:
        with np.load(path, allow_pickle=False) as data:
            found = ReferenceStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64),
                                   int(data["count"]), str(data["extractor"]), int(data["resolution"]))
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist; compute it with `python -m pipeline eval-stats`") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{key}: {path} is not a stats file written by `python -m pipeline eval-stats` "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if found.extractor != extractor:
        raise ConfigError(f"{key}: {path} was computed with feature extractor {found.extractor[:16]}..., this "
                          f"evaluation uses {extractor[:16]}...; recompute it with `python -m pipeline eval-stats`")
    if found.resolution != resolution:
        raise ConfigError(f"{key}: {path} was computed at resolution {found.resolution}, this evaluation generates "
                          f"{resolution} px; recompute it with `eval-stats --resolution {resolution}`")
    return found
