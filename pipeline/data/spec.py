"""The contract between a stage and the data layer.

A stage says what it needs per sample with a :class:`SampleSpec`; the reader (``pipeline.data.loader``)
delivers batches as dicts:

    "image":   uint8 (B, 3, S, S), resized + cropped to S = spec.image_size, NOT normalised
               (absent when spec.image_size == 0, and in training batches made from per-bucket precomputed arrays
               when spec.decode_image is False); with data.buckets (training only) uint8 (B, 3, H, W), one
               bucket shape per batch, plus (SDXL size and crop conditioning, int64 (B, 2) each):
    "orig_size":      (height, width) of the image as shown, before resizing
    "crop_top_left":  (top, left) of the crop inside the image resized to cover the bucket
    "target_size":    (height, width) of the bucket
    "caption": list[str] of length B                                     (always)
    "key":     list[str] of length B, the WebDataset sample keys          (always)
    "loss_mask": uint8 (B, 1, S, S), per-pixel loss weight * 255, cropped like the image   (spec.loss_mask)
    **spec.tokenize(captions)                                             (e.g. "text": int64 (B, L))
    one stacked array per name in spec.precomputed, (B, *shape) in the stored dtype, e.g.
               "t5_emb" float16 (B, L, D), "t5_mask" bool (B, L), "clip_image_emb" float32 (B, E)
               (read from precomputed shards aligned with the source shards, see pipeline.data.aligned)

Images stay uint8 until they reach the device: a uint8 batch is 4x smaller than float32 in the workers' shared
memory (whose first touch costs as much as JPEG decoding at 256 px) and in host-to-device traffic. The trainer
calls :func:`normalize_batch` (or :func:`normalize_images`) on every training and evaluation batch, so stages
receive ``batch["image"]`` as (x / 255 - mean) / std in their compute dtype on their device, as before.

Loaders are iterables of such batches with ``state_dict()`` / ``load_state_dict()`` for exact resume and
``skip_counts()`` for samples/shards skipped by reason.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SampleSpec:
    """What one stage needs from each sample.

    image_size: output side length in pixels (square); 0 means the stage needs no image.
    image_mean, image_std: per-channel normalisation that :func:`normalize_images` applies after scaling pixels
        to [0, 1] (the loader itself delivers uint8).
    tokenize: batched caption tokenizer run inside the loader workers; returns tensors with a leading B dim.
        Must be picklable or fork-safe (it is copied into worker processes).
    precomputed: names of per-sample arrays read from aligned precomputed shards (e.g. "t5_emb", "t5_mask");
        needs data.precomputed_urls (and data.eval_precomputed_urls for evaluation).
    loss_mask: also deliver "loss_mask" from each sample's optional ``KEY.mask.png`` (grayscale, the image's aspect
        ratio; 255 = full weight, 0 = ignored, e.g. watermarks or padding), cropped and resized with the image;
        255 everywhere for a sample without one.
    per_bucket: names in `precomputed` computed from the cropped image (latents): with data.buckets, training
        needs them precomputed per bucket of the same bucket set with centre crops (``shards precompute
        --buckets-config RUN.yaml``), and the sample's bucket is the one they were made for.
    decode_image: False = training batches of such a bucketed loader carry no "image": it is not decoded, the
        bucket and size conditioning come from the stored crop record, and a sample the precompute could not
        encode is skipped under the reason it recorded (evaluation batches always carry images).
    """

    image_size: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tokenize: Tokenizer | None = None
    precomputed: tuple[str, ...] = ()
    loss_mask: bool = False
    per_bucket: tuple[str, ...] = ()
    decode_image: bool = True


def _scale_shift(spec: SampleSpec) -> tuple[list[float], list[float]]:
    """Per-channel fp32 constants with x * scale - shift == (x / 255 - mean) / std, as the reader always used."""
    std = np.asarray(spec.image_std, np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (np.asarray(spec.image_mean, np.float32) / std).astype(np.float32)
    return [float(v) for v in scale], [float(v) for v in shift]


def normalize_images(images: torch.Tensor, spec: SampleSpec, device: torch.device | str,
                     dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, 3, S, S) from the loader -> (x / 255 - mean) / std per channel, on `device`, in `dtype`.

    The copy is issued with non_blocking=True (it overlaps with queued GPU work when the batch is in pinned
    memory). The arithmetic runs in fp32 on the device and is cast to `dtype` at the end. The per-channel
    constants are passed as Python scalars, not tensors: building a tiny constant tensor on the GPU would be a
    synchronous host-to-device copy per batch.

    Raises:
        TypeError: `images` is not uint8 (e.g. already normalised: normalising twice would be silent garbage).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects the loader's uint8 images, got {images.dtype}; "
                        f"was the batch normalised already?")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_images expects (B, 3, S, S) images, got shape {tuple(images.shape)}")
    x = images.to(device, non_blocking=True).to(torch.float32)
    scale, shift = _scale_shift(spec)
    for c in range(3):  # same fp32 multiply-then-subtract as the reader's former numpy path: identical values
        x[:, c].mul_(scale[c]).sub_(shift[c])
    return x.to(dtype)


def normalize_batch(batch: dict[str, Any], spec: SampleSpec, device: torch.device | str,
                    dtype: torch.dtype) -> dict[str, Any]:
    """A shallow copy of `batch` whose "image" (if any) went through :func:`normalize_images`.

    Everything else is left as the loader made it (stages move their own tensors to the device).
    """
    if "image" not in batch:
        return batch
    return {**batch, "image": normalize_images(batch["image"], spec, device, dtype)}


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
