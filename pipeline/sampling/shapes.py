"""Which image shapes a cascade can make: each level samples only the shapes it was trained on (its buckets), and
the levels' shapes must scale into each other exactly (a super-resolution level upsamples the previous level's
whole image by its resolution ratio).

A shape is (height, width) in pixels of the cascade's final output; level i then makes that shape scaled by
resolution_i / resolution_last. A level without buckets was trained on squares of its resolution only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Protocol

from pipeline.errors import UsageError

Shape = tuple[int, int]  # (height, width) in pixels
NEAREST = 3  # valid shapes an error names


class Level(Protocol):
    """What this module reads of a cascade level (pipeline.sampling.cascade.CascadeLevel)."""

    name: str
    resolution: int

    @property
    def shapes(self) -> tuple[Shape, ...]: ...


def scaled(shape: Shape, ratio: Fraction) -> Shape | None:
    """`shape` times `ratio`, or None when a side would not be a whole number of pixels."""
    height, width = shape[0] * ratio, shape[1] * ratio
    if height.denominator != 1 or width.denominator != 1:
        return None
    return int(height), int(width)


def level_shapes(levels: Sequence[Level], shape: Shape) -> list[Shape] | None:
    """Each level's (height, width) for final output `shape`, or None when some level cannot make its share."""
    last = levels[-1].resolution
    out = []
    for level in levels:
        own = scaled(shape, Fraction(level.resolution, last))
        if own is None or own not in level.shapes:
            return None
        out.append(own)
    return out


def valid_shapes(levels: Sequence[Level]) -> list[Shape]:
    """Every final (height, width) the whole cascade can make, ordered by aspect ratio (width / height)."""
    last = levels[-1].resolution
    candidates = {s for level in levels for s in
                  [scaled(b, Fraction(last, level.resolution)) for b in level.shapes] if s is not None}
    return sorted((s for s in candidates if level_shapes(levels, s) is not None), key=lambda s: (s[1] / s[0], s[1]))


def nearest(shapes: Sequence[Shape], shape: Shape, count: int = NEAREST) -> list[Shape]:
    """The `count` shapes closest to `shape`: by aspect ratio (log space), then by area (log space)."""
    def distance(s: Shape) -> tuple[float, float]:
        return (abs(math.log((s[1] / s[0]) / (shape[1] / shape[0]))),
                abs(math.log((s[0] * s[1]) / (shape[0] * shape[1]))))
    return sorted(shapes, key=distance)[:count]


def cascade_shapes(levels: Sequence[Level], height: int, width: int) -> list[Shape]:
    """Each level's (height, width) for a final height x width image; UsageError (one line, naming the nearest
    shapes the cascade can make) when it cannot make it."""
    if height < 1 or width < 1:
        raise UsageError(f"--height and --width must be positive pixel counts, got {height} x {width}")
    found = level_shapes(levels, (height, width))
    if found is not None:
        return found
    valid = valid_shapes(levels)
    names = ", ".join(f"{h}x{w}" for h, w in nearest(valid, (height, width)))
    raise UsageError(f"this cascade cannot make {height}x{width} (height x width) images: every stage samples "
                     f"only the shapes it was trained on (its buckets in the bundle), scaled along the cascade; "
                     f"nearest valid: {names or 'none'}")
