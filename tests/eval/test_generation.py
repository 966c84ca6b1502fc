"""Gathered generation shares: any split over ranks gives the numbers of one share; FID against reference
statistics when given; no KID without real images."""
from __future__ import annotations

import pytest
import torch

from pipeline.eval.frechet import FeatureStats, ReferenceStats, frechet_from_stats
from pipeline.eval.generation import generation_figures, sample_id
from pipeline.eval.kid import kernel_distance


def _rows(n: int, dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"ids": torch.randperm(10 * n, generator=g)[:n], "fake": torch.randn(n, dim, generator=g) + 0.3,
            "real": torch.randn(n, dim, generator=g, dtype=torch.float64), "scores": torch.rand(n, generator=g) * 40}


def test_any_split_over_ranks_gives_the_numbers_of_one_share():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    whole = _rows(24, 6, g)
    order = torch.randperm(24, generator=g)
    parts = [{k: v[order[i::3]] for k, v in whole.items()} for i in range(3)]  # 3 ranks, interleaved
    one = generation_figures([whole], kid_subsets=4, kid_subset_size=10)
    three = generation_figures(parts, kid_subsets=4, kid_subset_size=10)
    assert one.keys() == three.keys() == {"images", "fid", "kid", "kid_std", "clip_score"}
    for key in one:
        assert three[key] == pytest.approx(one[key], rel=1e-10, abs=1e-12), key
    expected = frechet_from_stats(FeatureStats.of(whole["real"]), FeatureStats.of(whole["fake"]))
    assert one["fid"] == pytest.approx(expected, rel=1e-10)
    assert one["clip_score"] == pytest.approx(float(whole["scores"].double().mean()), rel=1e-6)
    by_id = torch.argsort(whole["ids"])
    assert one["kid"] == kernel_distance(whole["real"][by_id], whole["fake"][by_id], 4, 10, 0)[0]


def test_reference_statistics_replace_the_real_images_for_fid_and_kid_needs_real_images():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    rows = _rows(16, 5, g)
    reference_features = torch.randn(40, 5, generator=g, dtype=torch.float64) * 2
    reference = ReferenceStats.from_stats(FeatureStats.of(reference_features), "x", 8)
    with_ref = generation_figures([rows], reference, kid_subsets=2, kid_subset_size=8)
    assert with_ref["fid"] == pytest.approx(frechet_from_stats(FeatureStats.of(reference_features),
                                                               FeatureStats.of(rows["fake"])), rel=1e-10)
    no_real = generation_figures([{k: v for k, v in rows.items() if k != "real"}])
    assert "fid" not in no_real and "kid" not in no_real and "clip_score" in no_real
    assert sample_id("train00000001") == sample_id("train00000001") != sample_id("train00000002")
