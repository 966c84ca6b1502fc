"""Generation figures in a CLIP's own image-feature space, for runs without Inception weights (the demo): the
Frechet distance between CLIP image embeddings of a set and of reference images ("FD in CLIP space": the FID
machinery with another feature extractor, so its numbers are not FIDs and are never reported as such) and the
CLIP score of each set against its captions."""
from __future__ import annotations

import torch

from pipeline.eval.clip_score import clip_image_features, clip_scores, clip_text_features
from pipeline.eval.frechet import FeatureStats, frechet_from_stats
from pipeline.models.frozen_clip import FrozenClip


def clip_space_figures(clip: FrozenClip, reference: torch.Tensor,
                       sets: dict[str, tuple[torch.Tensor, list[str]]]) -> dict[str, float]:
    """{"fd_clip<suffix>": FD to the reference images, "clip_score<suffix>": mean CLIP score} for each
    suffix -> (images (N, 3, H, W) in [0, 1], their N captions) of `sets`; reference (M, 3, H', W') in [0, 1]."""
    reference_stats = FeatureStats.of(clip_image_features(clip, reference))
    figures = {}
    for suffix, (images, captions) in sets.items():
        features = clip_image_features(clip, images)
        figures[f"fd_clip{suffix}"] = frechet_from_stats(reference_stats, FeatureStats.of(features))
        figures[f"clip_score{suffix}"] = float(clip_scores(features, clip_text_features(clip, captions)).mean())
    return figures
