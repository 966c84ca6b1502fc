"""The contract between a stage and the data layer.

A stage says what it needs per sample with a :class:`SampleSpec`; the reader (``pipeline.data.loader``)
delivers batches as dicts:

    "image":   float32 (B, 3, S, S), resized + cropped to S = spec.image_size, scaled to [0, 1], then
               normalised as (x - mean) / std per channel               (absent when spec.image_size == 0)
    "caption": list[str] of length B                                     (always)
    "key":     list[str] of length B, the WebDataset sample keys          (always)
    **spec.tokenize(captions)                                             (e.g. "text": int64 (B, L))
    one stacked tensor per name in spec.precomputed                       (from aligned precomputed shards)

Loaders are iterables of such batches with ``state_dict()`` / ``load_state_dict()`` for exact resume and
``skip_counts()`` for samples/shards skipped by reason.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SampleSpec:
    """What one stage needs from each sample.

    image_size: output side length in pixels (square); 0 means the stage needs no image.
    image_mean, image_std: per-channel normalisation applied after scaling pixels to [0, 1].
    tokenize: batched caption tokenizer run inside the loader workers; returns tensors with a leading B dim.
        Must be picklable or fork-safe (it is copied into worker processes).
    precomputed: names of per-sample arrays read from aligned precomputed shards (e.g. "t5_emb", "t5_mask").
    """

    image_size: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tokenize: Tokenizer | None = None
    precomputed: tuple[str, ...] = ()


class BatchLoader(Protocol):
    """What the Trainer needs from a training-data loader (one per rank)."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out (all workers), enough to continue exactly."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch recorded in `state`; raises DataError if it cannot resume exactly."""
        ...

    def skip_counts(self) -> dict[str, int]:
        """Samples (or shards) skipped so far, by reason, e.g. {"corrupt_image": 2, "missing_caption": 1}."""
        ...
