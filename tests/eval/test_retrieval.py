"""Recall@k within a pool, with duplicate captions counted as positives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.eval.retrieval import retrieval_sums


def test_perfect_and_reversed_retrieval():
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(10, 32, generator=g, dtype=torch.float64), dim=-1)
    captions = [f"caption {i}" for i in range(10)]
    perfect = retrieval_sums(feats, feats, captions)
    assert perfect == {f"{d}_recall@{k}": (10.0, 10.0) for d in ("i2t", "t2i") for k in (1, 5)}
    # Texts paired with the wrong images (a cyclic shift): nothing matches at rank 1.
    shifted = retrieval_sums(feats, feats.roll(1, dims=0), captions)
    assert shifted["i2t_recall@1"] == (0.0, 10.0) and shifted["t2i_recall@1"] == (0.0, 10.0)


def test_recall_at_k_counts_rank_positions():
    # similarity[i, j] = <image i, text j>; image 0 scores texts (0.1, 0.9, 0.8, 0.05): its true text is 3rd.
    images = torch.eye(4, dtype=torch.float64)
    texts = torch.eye(4, dtype=torch.float64)
    texts[:, 0] = torch.tensor([0.1, 0.9, 0.8, 0.05], dtype=torch.float64)
    sums = retrieval_sums(images, texts, ["a", "b", "c", "d"], ks=(1, 2, 3))
    assert sums["i2t_recall@1"] == (3.0, 4.0)
    assert sums["i2t_recall@2"] == (3.0, 4.0)
    assert sums["i2t_recall@3"] == (4.0, 4.0)
    assert sums["t2i_recall@1"] == (4.0, 4.0)  # each text's own image still scores highest


def test_duplicate_captions_count_as_positives():
    images = torch.eye(3, dtype=torch.float64)
    texts = torch.eye(3, dtype=torch.float64)[[1, 0, 2]]  # samples 0 and 1 swapped
    captions = ["same", "same", "other"]
    sums = retrieval_sums(images, texts, captions)
    assert sums["i2t_recall@1"] == (3.0, 3.0) and sums["t2i_recall@1"] == (3.0, 3.0)
    distinct = retrieval_sums(images, texts, ["x", "y", "other"])
    assert distinct["i2t_recall@1"] == (1.0, 3.0)
