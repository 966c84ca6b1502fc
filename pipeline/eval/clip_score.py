"""CLIP score: 100 * max(cos(image embedding, caption embedding), 0) per image (Hessel et al. 2021, the
definition torchmetrics' CLIPScore uses), with any open_clip model wrapped as a FrozenClip (a local folder or a
bundle's own CLIP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.frozen_clip import FrozenClip


def clip_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """image_features (N, E), text_features (N, E), row i of both the same sample -> (N,) float64 scores."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image_features.shape)} vs "
                         f"{tuple(text_features.shape)}")
    cos = F.cosine_similarity(image_features.double(), text_features.double(), dim=-1)
    return 100.0 * cos.clamp(min=0)


def clip_image_features(clip: FrozenClip, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """images (N, 3, H, W) in [0, 1] -> (N, E) float32 L2-normalised image embeddings (bicubic resize to the
    model's input side, then its mean/std normalisation, as its preprocessing does)."""
    info = clip.info
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    out = []
    for chunk in images.split(batch_size):
        pixels = chunk.float().cpu()
        if pixels.shape[-1] != info.image_size or pixels.shape[-2] != info.image_size:
            pixels = F.interpolate(pixels, size=(info.image_size, info.image_size), mode="bicubic",
                                   align_corners=False, antialias=True).clamp(0, 1)
        out.append(clip.encode_image(((pixels - mean) / std).to(clip.device)).float().cpu())
    return torch.cat(out)


def clip_text_features(clip: FrozenClip, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """captions -> (N, E) float32 L2-normalised text embeddings."""
    return torch.cat([clip.encode_prompts(captions[i:i + batch_size]).pooled.float().cpu()
                      for i in range(0, len(captions), batch_size)])


def clip_score_of(clip: FrozenClip, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """(N,) CLIP scores of images (N, 3, H, W) in [0, 1] against their captions."""
    return clip_scores(clip_image_features(clip, images), clip_text_features(clip, captions))
