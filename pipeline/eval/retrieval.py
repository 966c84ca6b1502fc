"""Image-text retrieval recall@k within a pool (one evaluation batch).

Captions can repeat inside a pool (two held-out scenes may be drawn from the same attribute combination), so a
retrieved item counts as correct when its caption equals the query's ground-truth caption: for text->image, any
image whose caption is the query text; for image->text, any text equal to the image's caption. Chance level is
about (number of duplicates) / pool size.
"""
from __future__ import annotations

import torch


def _correct_at_k(similarity: torch.Tensor, same: torch.Tensor, ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """similarity (Q, P), same (Q, P) bool -> {k: (Q,) bool, some positive among the top-k of each row}."""
    order = similarity.argsort(dim=1, descending=True)
    hits = torch.gather(same, 1, order)  # (Q, P): is the j-th ranked item a positive?
    return {k: hits[:, : min(k, hits.shape[1])].any(dim=1) for k in ks}


def retrieval_sums(image_features: torch.Tensor, text_features: torch.Tensor, captions: list[str],
                   ks: tuple[int, ...] = (1, 5)) -> dict[str, tuple[float, float]]:
    """Recall@k sums for one pool: {"i2t_recall@k": (hits, count), "t2i_recall@k": (hits, count)}.

    image_features, text_features: (P, D), row i of both belongs to sample i with caption captions[i].
    Returned as (sum, count) so pools of any size and from any rank combine exactly.
    """
    if image_features.shape[0] != text_features.shape[0] or image_features.shape[0] != len(captions):
        raise ValueError("image_features, text_features and captions must describe the same samples")
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([ids[c] for c in captions])
    same = caption_ids[:, None] == caption_ids[None, :]  # (P, P), symmetric
    sims = image_features.float() @ text_features.float().T  # (P images, P texts)
    count = float(len(captions))
    out: dict[str, tuple[float, float]] = {}
    for name, hits in (("i2t", _correct_at_k(sims, same, ks)), ("t2i", _correct_at_k(sims.T, same, ks))):
        for k, ok in hits.items():
            out[f"{name}_recall@{k}"] = (float(ok.sum()), count)
    return out
