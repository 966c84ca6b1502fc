"""Zero-shot attribute probes: exact on an oracle encoder, wrong where the encoder is blind to an attribute."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from pipeline.data.synthetic import SceneObject, describe
from pipeline.eval.attributes import ATTRIBUTE_VALUES, attribute_accuracy, candidate_captions, chance_levels


def caption_vector(caption: str, dim: int = 64) -> torch.Tensor:
    """A fixed pseudo-random unit vector per caption (an 'encoder' that separates every caption)."""
    seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
    return F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=0)


OBJECTS = [SceneObject("large", "red", "circle", "left"), SceneObject("small", "cyan", "triangle", "top"),
           SceneObject("small", "white", "square", "center")]


def test_oracle_image_features_score_every_attribute():
    images = torch.stack([caption_vector(describe(o)) for o in OBJECTS])
    sums = attribute_accuracy(images, OBJECTS, lambda caps: torch.stack([caption_vector(c) for c in caps]))
    assert sums == {attribute: (3.0, 3.0) for attribute in ATTRIBUTE_VALUES}


def test_encoder_blind_to_position_fails_position_only():
    def blind(caption: str) -> torch.Tensor:  # drops the position phrase: every position looks the same
        return caption_vector(" ".join(caption.split()[:4]))

    images = torch.stack([blind(describe(o)) for o in OBJECTS])
    sums = attribute_accuracy(images, OBJECTS, lambda caps: torch.stack([blind(c) for c in caps]))
    assert sums["colour"] == sums["shape"] == sums["size"] == (3.0, 3.0)
    # Ties resolve to the first position ("left"): only the object that really is on the left counts.
    assert sums["position"] == (1.0, 3.0)


def test_candidates_and_chance():
    captions = candidate_captions(OBJECTS[0], "colour")
    assert len(captions) == 8 and describe(OBJECTS[0]) in captions
    assert chance_levels() == {"colour": 1 / 8, "shape": 1 / 3, "size": 1 / 2, "position": 1 / 5}
