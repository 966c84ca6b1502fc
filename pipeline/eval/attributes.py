"""Zero-shot attribute probes on the synthetic dataset, scored by a CLIP model.

For a single-object scene "a large red circle on the left", the probe for `colour` asks which of the eight
captions "a large {c} circle on the left" the image matches best; likewise for shape, size and position. The
accuracy per attribute (chance: 1/8, 1/3, 1/2, 1/5) shows what an image encoder learned, and - scored by a
trained CLIP on generated images - whether a generator drew what the prompt said.

Shapes: images (N, 3, S, S) already preprocessed for the CLIP model; features are L2-normalised.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from pipeline.data.synthetic import COLOURS, POSITIONS, SHAPES, SIZES, SceneObject, describe

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS),
}

EncodeText = Callable[[list[str]], torch.Tensor]


def candidate_captions(obj: SceneObject, attribute: str) -> list[str]:
    """The captions of `obj` with `attribute` set to each of its possible values (true value included)."""
    return [describe(replace(obj, **{attribute: value})) for value in ATTRIBUTE_VALUES[attribute]]


@torch.no_grad()
def attribute_accuracy(image_features: torch.Tensor, objects: list[SceneObject],
                       encode_text: EncodeText) -> dict[str, tuple[float, float]]:
    """Per attribute (hits, count) of zero-shot classification of single-object scenes.

    image_features: (N, D) normalised features of N single-object images; objects[i] is what image i shows;
    encode_text: captions -> (len, D) normalised features.
    """
    if image_features.shape[0] != len(objects):
        raise ValueError("one object description per image is required")
    out: dict[str, tuple[float, float]] = {}
    cache: dict[str, torch.Tensor] = {}
    for attribute, values in ATTRIBUTE_VALUES.items():
        hits = 0
        for feature, obj in zip(image_features, objects):
            captions = candidate_captions(obj, attribute)
            missing = [c for c in captions if c not in cache]
            if missing:
                cache.update(zip(missing, encode_text(missing).float()))
            scores = torch.stack([cache[c] for c in captions]) @ feature.float()
            hits += int(values[int(scores.argmax())] == getattr(obj, attribute))
        out[attribute] = (float(hits), float(len(objects)))
    return out


def chance_levels() -> dict[str, float]:
    """Accuracy of guessing uniformly, per attribute."""
    return {attribute: 1.0 / len(values) for attribute, values in ATTRIBUTE_VALUES.items()}
