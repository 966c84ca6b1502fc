"""Aspect-ratio buckets: the shapes, which bucket an image goes to, and the per-stream waiting lists.

Shapes. ``bucket_shapes`` lists (height, width) pairs of about resolution**2 pixels whose sides are multiples of a
step (so every down-sampling of the network divides them), between a minimum and maximum side, both
orientations of each, ordered by aspect ratio (width / height). The square (R, R) is always one of them.

Assignment. An image (as shown, after its EXIF orientation) goes to the bucket of nearest aspect ratio in log
space (4:3 is as far from 1:1 as 3:4), is resized to cover the bucket and cropped along its long side only, by
the least possible amount (transforms.crop_for_target).

Waiting. ``BucketBatcher`` keeps, per stream, one list per bucket; a decoded sample waits in its bucket's list
until the list holds a micro-batch, which is then handed out whole. Nothing is padded and nothing is dropped:
the stream is infinite, so a partly filled bucket carries over (across epochs too). Its state is the
[k, index, key] references of the waiting samples (like the shuffle buffer's); on resume they are re-read and
decoded again (decoding is a pure function of the sample and its seed), so the following batches are
bit-identical.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipeline.config import BucketConfig
from pipeline.errors import ConfigError, DataError

Shape = tuple[int, int]  # (height, width) in pixels
ASPECT_SLACK = 1.2  # auto max_aspect_ratio: images up to 1.2x wider (or taller) than the widest bucket are kept


def bucket_shapes(resolution: int, min_side: int, max_side: int, step: int) -> tuple[Shape, ...]:
    """(height, width) shapes with h * w <= resolution**2 as close as the step allows, ordered by w / h.

    For each width w (a multiple of `step` in [min_side, max_side]) the tallest multiple-of-step height with
    h * w <= resolution**2, kept when it lies in [min_side, max_side]; then both orientations of each.
    """
    if resolution % step:
        raise ConfigError(f"data.resolution (or the stage's image size) {resolution} is not a multiple of "
                          f"data.buckets.step={step}")
    low = max(step, math.ceil(min_side / step) * step)
    area = resolution * resolution
    shapes: set[Shape] = set()
    for width in range(low, max_side + 1, step):
        height = area // width // step * step
        if low <= height <= max_side:
            shapes.update({(height, width), (width, height)})
    if not shapes:
        raise ConfigError(f"data.buckets: no bucket between {min_side} and {max_side} px with step {step} for "
                          f"resolution {resolution}")
    return tuple(sorted(shapes, key=lambda s: (s[1] / s[0], s[1])))


def resolve_shapes(cfg: BucketConfig, resolution: int) -> tuple[Shape, ...]:
    """The configured shapes (explicit, else generated for `resolution`), ordered by aspect ratio."""
    if cfg.shapes:
        return tuple(sorted({(int(h), int(w)) for h, w in cfg.shapes}, key=lambda s: (s[1] / s[0], s[1])))
    return bucket_shapes(resolution, cfg.min_side or resolution // 2, cfg.max_side or resolution * 2, cfg.step)


def nearest_bucket(width: int, height: int, shapes: Sequence[Shape]) -> int:
    """Index of the shape whose aspect ratio is nearest to width / height (in log space; ties: the first)."""
    target = math.log(width / height)
    return min(range(len(shapes)), key=lambda i: abs(math.log(shapes[i][1] / shapes[i][0]) - target))


def widest_ratio(shapes: Sequence[Shape]) -> float:
    """The largest long/short side ratio among the shapes."""
    return max(max(h, w) / min(h, w) for h, w in shapes)


def auto_limits(shapes: Sequence[Shape], min_image_size: int, max_aspect_ratio: float) -> tuple[int, float]:
    """data.min_image_size / max_aspect_ratio resolved for buckets: -1 -> the smallest bucket side, 0 -> widest
    bucket ratio x ASPECT_SLACK (an image far wider than every bucket would lose most of itself to the crop)."""
    min_size = min_image_size if min_image_size >= 0 else min(min(s) for s in shapes)
    max_ratio = max_aspect_ratio or widest_ratio(shapes) * ASPECT_SLACK
    return min_size, max_ratio


@dataclass(slots=True)
class Waiting:
    """One decoded sample waiting in its bucket: its reference (unit read k, in-shard index, key) and payload."""

    k: int
    index: int
    key: str
    decoded: tuple


class BucketBatcher:
    """Per-bucket waiting lists of one stream; `add` returns a full micro-batch of one bucket, else None."""

    def __init__(self, num_buckets: int, batch_size: int) -> None:
        self.batch_size = batch_size
        self.waiting: list[list[Waiting]] = [[] for _ in range(num_buckets)]

    def add(self, bucket: int, item: Waiting) -> list[Waiting] | None:
        waiting = self.waiting[bucket]
        waiting.append(item)
        if len(waiting) < self.batch_size:
            return None
        self.waiting[bucket] = []
        return waiting

    def snapshot(self) -> list[list[list]]:
        """Per bucket, the waiting samples as [k, index, key] (plain data)."""
        return [[[w.k, w.index, w.key] for w in waiting] for waiting in self.waiting]

    def restore(self, state: list[list[list]], load: Callable[[list[tuple[int, int, str]]], list[tuple]]) -> None:
        """Refill the lists from a snapshot(); `load` decodes the referenced samples again, in order."""
        if len(state) != len(self.waiting):
            raise DataError(f"cannot resume the data stream exactly: the saved state has {len(state)} buckets, "
                            f"this run has {len(self.waiting)}; resume with the same data.buckets")
        refs = [(int(k), int(i), str(key)) for bucket in state for k, i, key in bucket]
        decoded = iter(load(refs))
        self.waiting = [[Waiting(int(k), int(i), str(key), next(decoded)) for k, i, key in bucket]
                        for bucket in state]
