"""FID, KID and CLIP score of a generative stage's evaluation images, computed from every rank's share.

Each rank generates images for its share of the held-out captions and calls :meth:`GenerationMetrics.add` per
batch; :meth:`GenerationMetrics.share` is what it sends to the others (the caller owns the collective: this
module stays free of torch.distributed); :func:`generation_figures` turns the gathered shares into numbers. Rows
are ordered by their sample id before anything is computed, so one rank and N ranks give the same numbers (to
the rounding of the images themselves).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from pipeline.eval.clip_score import clip_image_features, clip_scores, clip_text_features
from pipeline.eval.frechet import FeatureStats, ReferenceStats, frechet_distance, frechet_from_stats
from pipeline.config import EvalConfig
from pipeline.eval.inception import InceptionFeatures, load_inception
from pipeline.eval.kid import kernel_distance
from pipeline.models.frozen_clip import FrozenClip


def sample_id(key: str) -> int:
    """A 63-bit id of a held-out sample from its key: what orders the gathered rows and seeds its image."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") >> 1


def quality_models(ecfg: EvalConfig, device: torch.device) -> tuple[InceptionFeatures | None, FrozenClip | None]:
    """The Inception extractor (eval.inception_weights) and the CLIP (eval.clip) an evaluation uses, fp32 on
    `device`; None for each that is not configured."""
    inception = load_inception(ecfg.inception_weights).to(device) if ecfg.inception_weights else None
    clip = FrozenClip.load(ecfg.clip, "eval.clip").to(device) if ecfg.clip else None
    return inception, clip


@dataclass
class GenerationMetrics:
    """One rank's rows: sample ids, Inception features of generated and real images, CLIP scores."""

    inception: InceptionFeatures | None
    clip: FrozenClip | None
    ids: list[int] = field(default_factory=list)
    fake: list[torch.Tensor] = field(default_factory=list)
    real: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)

    def add(self, ids: list[int], generated: torch.Tensor, real: torch.Tensor | None, captions: list[str]) -> None:
        """ids: B sample ids; generated, real: (B, 3, H, W) in [0, 1] (real None: batches without images, e.g.
        precomputed latents; FID then needs reference statistics and KID is left out); captions: the B captions."""
        self.ids.extend(ids)
        if self.inception is not None:
            self.fake.append(self.inception(generated))
            if real is not None:
                self.real.append(self.inception(real))
        if self.clip is not None:
            self.scores.append(clip_scores(clip_image_features(self.clip, generated),
                                           clip_text_features(self.clip, captions)))

    def share(self) -> dict[str, torch.Tensor]:
        """This rank's rows as CPU tensors: ids (N,), fake/real (N, 2048) float64 (if Inception), scores (N,)."""
        out = {"ids": torch.tensor(self.ids, dtype=torch.int64)}
        for name in ("fake", "real", "scores"):
            rows = getattr(self, name)
            if rows:
                out[name] = torch.cat(rows)
        return out


def _ordered(shares: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every rank's rows concatenated and sorted by sample id."""
    ids = torch.cat([s["ids"] for s in shares])
    order = torch.argsort(ids, stable=True)
    merged = {"ids": ids[order]}
    for name in ("fake", "real", "scores"):
        if any(name in s for s in shares):
            merged[name] = torch.cat([s[name] for s in shares if name in s])[order]
    return merged


def generation_figures(shares: list[dict[str, torch.Tensor]], reference: ReferenceStats | None = None,
                       kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """{"fid", "kid", "kid_std", "clip_score", "images"} from the gathered shares (those it can compute).

    FID compares the generated images' Inception statistics with `reference` when given, else with the real images
    of the same samples; KID always with those real images (it needs features, not statistics), so it is left out
    when the shares hold none (prompts without images)."""
    rows = _ordered(shares)
    out = {"images": float(rows["ids"].numel())}
    if "fake" in rows and rows["fake"].shape[0] >= 2:
        fake = FeatureStats.of(rows["fake"])
        if reference is not None:
            out["fid"] = frechet_distance(fake.mean(), fake.covariance(), torch.from_numpy(reference.mean),
                                          torch.from_numpy(reference.covariance))
        elif "real" in rows:
            out["fid"] = frechet_from_stats(FeatureStats.of(rows["real"]), fake)
        if "real" in rows:
            out["kid"], out["kid_std"] = kernel_distance(rows["real"], rows["fake"], kid_subsets, kid_subset_size,
                                                         seed)
    if "scores" in rows:
        out["clip_score"] = float(rows["scores"].mean())
    return out
