"""Generation metrics on real-looking images (the synthetic scenes) with a tiny CLIP trained in the test: the
Frechet distance in its image-feature space is near 0 for two samples of one distribution and grows with blur and
noise; CLIP score ranks true captions above shuffled ones on held-out images."""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from eval_helpers import scenes, train_tiny_clip
from pipeline.eval.clip_score import clip_image_features, clip_score_of, clip_scores
from pipeline.eval.frechet import FeatureStats, frechet_from_stats
from pipeline.models.frozen_clip import FrozenClip


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> FrozenClip:
    return FrozenClip.load(train_tiny_clip(tmp_path_factory.mktemp("clip"), steps=40))


def test_clip_score_is_100_times_clipped_cosine():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(clip_scores(image, text), torch.tensor([100.0, 0.0, 100 / 2 ** 0.5], dtype=torch.float64))


def test_clip_score_ranks_true_captions_above_shuffled_ones(clip):
    images, captions = scenes(64, "heldout", seed=int(torch.randint(0, 2**31, (1,))))
    shuffled = captions[1:] + captions[:1]
    assert sum(a != b for a, b in zip(captions, shuffled)) > 48
    true, wrong = clip_score_of(clip, images, captions), clip_score_of(clip, images, shuffled)
    assert true.mean() > wrong.mean() + 2.0
    assert (true > wrong).float().mean() > 0.5


def test_frechet_in_clip_space_near_zero_for_one_distribution_and_growing_with_damage(clip):
    seed = int(torch.randint(0, 2**30, (1,)))
    a, _ = scenes(500, "train", seed=seed)
    b, _ = scenes(500, "train", seed=seed + 1)
    reference = FeatureStats.of(clip_image_features(clip, a))

    def distance(images: torch.Tensor) -> float:
        return frechet_from_stats(reference, FeatureStats.of(clip_image_features(clip, images)))

    same = distance(b)
    blurred = [distance(TF.gaussian_blur(b, 5, sigma)) for sigma in (1.0, 2.0, 4.0)]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b.shape, generator=g)
    noised = [distance((b + level * noise).clamp(0, 1)) for level in (0.15, 0.3, 0.6)]
    for series in (blurred, noised):
        assert same < series[0] < series[1] < series[2], (same, series)
        assert same < 0.25 * series[-1]


def test_clip_space_figures_name_each_set_and_measure_against_the_reference(clip):
    from pipeline.eval.clip_space import clip_space_figures

    reference, _ = scenes(120, "train", seed=11)
    same, same_captions = scenes(120, "train", seed=12)
    blurred = TF.gaussian_blur(same, 5, 4.0)
    figures = clip_space_figures(clip, reference, {"": (same, same_captions), "_blur": (blurred, same_captions)})
    assert set(figures) == {"fd_clip", "clip_score", "fd_clip_blur", "clip_score_blur"}
    assert 0 <= figures["fd_clip"] < figures["fd_clip_blur"]
    assert figures["clip_score"] > figures["clip_score_blur"] > 0
