"""Held-out metrics of a diffusion prior: how close its image embeddings come to the true ones.

For each held-out sample: the true CLIP image embedding e (what the prior should predict), the CLIP text
embedding c of its caption (the baseline: using the text embedding itself as the image embedding, which is what
a cascade without a prior would condition on) and the prior's sample p. All (B, E) and L2-normalised.

- ``prior_cos`` / ``baseline_cos``: mean cosine(p, e) / cosine(c, e);
- ``prior_retrieval@k`` / ``baseline_retrieval@k``: the fraction of queries p (or c) whose k nearest true image
  embeddings within the pool (one evaluation batch) include the query's own image. As in
  :mod:`pipeline.eval.retrieval`, an image with exactly the query's caption counts as its own: the query only
  knows the caption, so two images drawn from the same caption cannot be told apart by it. Chance is about
  (images with that caption) / pool size.

Returned as (sum, count) pairs so batches and ranks combine exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.eval.retrieval import retrieval_sums

EvalPairs = dict[str, tuple[float, float]]


def cosine_sums(predicted: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(sum over rows of cosine(predicted_i, target_i), rows) for (B, E) tensors of any norm."""
    cos = (F.normalize(predicted.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(dim=-1)
    return float(cos.sum()), float(cos.numel())


def prior_eval_sums(predicted: torch.Tensor, text_emb: torch.Tensor, image_emb: torch.Tensor, captions: list[str],
                    ks: tuple[int, ...] = (1, 5)) -> EvalPairs:
    """Cosine and retrieval sums of one pool: predicted (B, E) prior samples, text_emb (B, E) CLIP text
    embeddings, image_emb (B, E) true CLIP image embeddings, captions (B,).

    Keys: prior_cos, baseline_cos, prior_retrieval@k, baseline_retrieval@k for k in `ks`.
    """
    if not predicted.shape == text_emb.shape == image_emb.shape or predicted.shape[0] != len(captions):
        raise ValueError(f"predicted {tuple(predicted.shape)}, text {tuple(text_emb.shape)} and image "
                         f"{tuple(image_emb.shape)} embeddings and {len(captions)} captions must describe the same "
                         "samples")
    out: EvalPairs = {"prior_cos": cosine_sums(predicted, image_emb), "baseline_cos": cosine_sums(text_emb, image_emb)}
    images = F.normalize(image_emb.float(), dim=-1)
    for name, queries in (("prior", predicted), ("baseline", text_emb)):
        # retrieval_sums' "t2i" direction ranks the images (first argument) for each query (second argument)
        found = retrieval_sums(images, F.normalize(queries.float(), dim=-1), captions, ks)
        for k in ks:
            out[f"{name}_retrieval@{k}"] = found[f"t2i_recall@{k}"]
    return out
