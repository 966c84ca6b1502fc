"""Feature statistics of real images from shards: what ``python -m pipeline eval-stats`` writes and what a
generative stage's FID is measured against.

Each image is decoded (EXIF orientation applied), centre-cropped to a square and resized to the side the evaluated
stage generates with clean-fid's resize (PIL bicubic per channel in float, :func:`clean_resize`), then rounded to
uint8: the same pixels a generated image of that side has once saved. Both then take the same path to the
feature extractor (clean resize to 299, TF-Inception), so real and generated images differ only in content.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.data.skips import SkipCounter
from pipeline.data.sources import expand_shard_specs
from pipeline.data.tar_reader import iter_shard
from pipeline.data.transforms import SkipSample, image_bytes
from pipeline.eval.frechet import FeatureStats
from pipeline.eval.inception import clean_resize

Extractor = Callable[[torch.Tensor], torch.Tensor]  # uint8 or [0, 1] images (N, 3, S, S) -> features (N, D)


def square_image(data: bytes, side: int) -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, side, side): EXIF-rotated, RGB, centre square crop, clean resize."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
            image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        raise SkipSample("corrupt_image", f"cannot decode image ({type(exc).__name__})") from None
    width, height = image.size
    short = min(width, height)
    left, top = (width - short) // 2, (height - short) // 2
    pixels = np.asarray(image.crop((left, top, left + short, top + short)))
    return clean_resize(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None], side)[0]


def iter_real_images(urls: str, side: int, num_samples: int, rank: int, world_size: int,
                     skips: SkipCounter) -> Iterator[torch.Tensor]:
    """This rank's images (uint8 (3, side, side)) among the first `num_samples` samples of the shards in order
    (0 = all); sample g belongs to rank g % world_size. Unreadable samples and shards are counted in `skips`."""
    number = 0
    for url in expand_shard_specs(urls, "SHARDS"):
        for _, _, members in iter_shard(url, skips.add):
            if num_samples and number >= num_samples:
                return
            mine = number % world_size == rank
            number += 1
            if not mine:
                continue
            skips.seen += 1
            try:
                yield square_image(image_bytes(members), side)
            except SkipSample as skip:
                skips.add(skip.reason, skip.detail)


def real_image_stats(urls: str, extract: Extractor, dim: int, side: int, num_samples: int = 0, rank: int = 0,
                     world_size: int = 1, batch_size: int = 32, skips: SkipCounter | None = None) -> FeatureStats:
    """Feature statistics (width `dim`) of this rank's share of the real images; sum them over ranks
    (:meth:`FeatureStats.flat` + all-reduce) for the whole set."""
    skips = skips if skips is not None else SkipCounter(max_fraction=1.0, min_seen=0)
    stats = FeatureStats.empty(dim)
    batch: list[torch.Tensor] = []

    def flush() -> None:
        stats.update(extract(torch.stack(batch)))
        batch.clear()

    for image in iter_real_images(urls, side, num_samples, rank, world_size, skips):
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return stats
