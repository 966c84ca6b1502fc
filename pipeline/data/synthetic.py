"""The embedded dataset: procedurally drawn, exactly captioned scenes of one or two coloured shapes.

Each object is a tuple (size, colour, shape, position). A fixed, seed-independent subset of those tuples is
*held out*: train scenes contain only the other tuples, held-out scenes contain at least one held-out tuple.
So no held-out caption ever appears in training data, while every colour, shape, size and position (and every
colour-shape pair) is still seen in training - later stages are measured on prompts they never saw.

Canvases may have other shapes than square (``aspects``, e.g. 16:9): about `resolution` squared pixels of area,
positions are fractions of the width and height ("on the left" is 0.27 of the width in every shape) and sizes
fractions of the short side, so a caption means the same on every canvas and a centre crop of a wide scene can
cut what its caption names.

Every sample stores the drawn attributes (``KEY.json``) from which its caption (``KEY.txt``) is derived, so
quality checks can compare generated images with what was asked for.
"""
from __future__ import annotations

import io
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.shard_writer import ShardWriter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (240, 215, 40),
    "purple": (150, 60, 200), "orange": (250, 140, 30), "white": (245, 245, 245), "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.11, "large": 0.2}  # radius as a fraction of the image's short side
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5),
}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
SPLITS = ("train", "heldout")
Split = Literal["train", "heldout"]
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges at tiny resolutions
Aspect = tuple[int, int]  # (width units, height units), e.g. (16, 9)
SQUARE: tuple[Aspect, ...] = ((1, 1),)


def parse_aspects(text: str) -> tuple[Aspect, ...]:
    """'1:1,4:3,16:9' -> ((1, 1), (4, 3), (16, 9)); ValueError naming the bad part."""
    aspects = []
    for part in text.split(","):
        w, sep, h = part.strip().partition(":")
        if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise ValueError(f"aspect ratio {part.strip()!r} is not W:H with positive integers (e.g. 16:9)")
        aspects.append((int(w), int(h)))
    if not aspects or max(max(w / h, h / w) for w, h in aspects) > 4:
        raise ValueError(f"aspect ratios {text!r}: give at least one, none beyond 4:1")
    return tuple(aspects)


def canvas_size(resolution: int, aspect: Aspect) -> tuple[int, int]:
    """(width, height) in pixels of about resolution**2 area with that aspect; (R, R) for 1:1."""
    ratio = (aspect[0] / aspect[1]) ** 0.5
    return max(8, round(resolution * ratio)), max(8, round(resolution / ratio))


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. `cx`, `cy`, `radius` are in pixels of the stored image (x from the left, y from the top)."""

    size: str
    colour: str
    shape: str
    position: str
    cx: float = 0.0
    cy: float = 0.0
    radius: float = 0.0

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        return (self.size, self.colour, self.shape, self.position)


ALL_TUPLES: list[tuple[str, str, str, str]] = list(itertools.product(SIZES, COLOURS, SHAPES, POSITIONS))
# Every 7th tuple (in a fixed order, independent of any seed) is held out: ~14% of the 240 combinations.
HELDOUT_TUPLES = frozenset(t for i, t in enumerate(ALL_TUPLES) if (5 * i + 3) % 7 == 0)
TRAIN_TUPLES = [t for t in ALL_TUPLES if t not in HELDOUT_TUPLES]
HELDOUT_LIST = [t for t in ALL_TUPLES if t in HELDOUT_TUPLES]


def describe(obj: SceneObject) -> str:
    """'a large red circle on the left'."""
    return f"a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}"


def caption_for(objects: list[SceneObject] | tuple[SceneObject, ...]) -> str:
    """The caption that says exactly what is drawn, objects in drawing order joined by 'and'."""
    return " and ".join(describe(o) for o in objects)


def parse_caption(caption: str) -> list[SceneObject] | None:
    """The objects a synthetic-style caption asks for (words only: cx/cy/radius stay 0), or None when the caption
    is not exactly of the form :func:`caption_for` writes ("a large red circle on the left and a small ...")."""
    phrases = {phrase: position for position, phrase in POSITION_PHRASES.items()}
    objects = []
    for part in caption.strip().lower().split(" and "):
        words = part.split()
        if len(words) < 5 or words[0] != "a":
            return None
        size, colour, shape, phrase = words[1], words[2], words[3], " ".join(words[4:])
        if size not in SIZES or colour not in COLOURS or shape not in SHAPES or phrase not in phrases:
            return None
        objects.append(SceneObject(size, colour, shape, phrases[phrase]))
    return objects if 1 <= len(objects) <= 2 else None


# Common English words the tiny T5's vocabulary holds beside the captions' own (prompts a user types at the demo).
_ENGLISH = ("a an the and or of on in at to with without near next beside above below under over left right top "
            "bottom center middle corner small large big tiny huge little one two three some many is are this that "
            "photo picture image drawing painting of dark light bright background shape object").split()


def caption_words() -> list[str]:
    """Every word of the synthetic captions plus common English words, sorted: the whole-word vocabulary of the
    tiny in-memory T5 (pipeline/text/t5.py, ``path: tiny``) the demo and the tests condition on."""
    phrases = " ".join(POSITION_PHRASES.values()).split()
    return sorted({*COLOURS, *SHAPES, *SIZES, *phrases, *_ENGLISH})


def _pick(rng: np.random.Generator, pool: list[tuple[str, str, str, str]], taken: set[str]):
    options = [t for t in pool if t[3] not in taken]
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, split: Split, resolution: int, height: int = 0) -> list[SceneObject]:
    """Draw the attributes of one scene: 1 or 2 objects at distinct positions, placed with small jitter.

    resolution: canvas width in pixels; height: canvas height (0 = square). Positions scale with each side,
    radii with the short side.
    """
    width, height = resolution, height or resolution
    count = 1 + int(rng.random() < 0.5)
    taken: set[str] = set()
    chosen = []
    for i in range(count):
        if split == "train":
            pool = TRAIN_TUPLES
        else:  # the first object guarantees the scene is unseen; a second one may be anything
            pool = HELDOUT_LIST if i == 0 else ALL_TUPLES
        attrs = _pick(rng, pool, taken)
        taken.add(attrs[3])
        chosen.append(attrs)
    if count == 2 and rng.random() < 0.5:  # the held-out object is not always the first one named
        chosen.reverse()
    objects = []
    for size, colour, shape, position in chosen:
        px, py = POSITIONS[position]
        jitter = rng.uniform(-0.03, 0.03, size=2)
        radius = SIZES[size] * float(rng.uniform(0.9, 1.1))
        objects.append(SceneObject(size, colour, shape, position, cx=round((px + jitter[0]) * width, 2),
                                   cy=round((py + jitter[1]) * height, 2),
                                   radius=round(radius * min(width, height), 2)))
    return objects


def render(objects: list[SceneObject], resolution: int, rng: np.random.Generator, height: int = 0) -> Image.Image:
    """Draw the scene on a dark, slightly tinted vertical-gradient background; returns an RGB image.

    resolution: width in pixels; height: height in pixels (0 = square).
    """
    width, height = resolution, height or resolution
    side_w, side_h = width * SUPERSAMPLE, height * SUPERSAMPLE
    base = rng.integers(35, 75, size=3)
    ramp = np.linspace(-12, 12, side_h)[:, None, None]
    background = np.clip(base[None, None, :] + ramp, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(np.broadcast_to(background, (side_h, side_w, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy, r = obj.cx * SUPERSAMPLE, obj.cy * SUPERSAMPLE, obj.radius * SUPERSAMPLE
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            h = r * 0.9  # similar area to the circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:  # equilateral triangle pointing up, circumradius slightly larger than r
            R = r * 1.15
            draw.polygon([(cx, cy - R), (cx - R * 0.866, cy + R * 0.5), (cx + R * 0.866, cy + R * 0.5)], fill=fill)
    return canvas.resize((width, height), Image.LANCZOS)


def encode_image(image: Image.Image, image_format: Literal["jpg", "png"]) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def make_sample(index: int, seed: int, split: Split, resolution: int, image_format: Literal["jpg", "png"] = "jpg",
                aspects: tuple[Aspect, ...] = SQUARE) -> tuple[str, dict[str, bytes]]:
    """Sample `index` of a split as (key, {ext: bytes}); a pure function of its arguments.

    The canvas shape cycles through `aspects` by index (equal shares; the scene RNG is the same as for squares).
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    width, height = canvas_size(resolution, aspects[index % len(aspects)])
    objects = sample_scene(rng, split, width, height)
    image = render(objects, width, rng, height)
    meta = {"objects": [asdict(o) for o in objects], "width": width, "height": height,
            "split": split, "index": index, "seed": seed}
    key = f"{split}{index:08d}"
    return key, {image_format: encode_image(image, image_format), "txt": caption_for(objects).encode("utf-8"),
                 "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


def write_synthetic_shards(out_dir: str | Path, num_samples: int, shard_size: int, resolution: int, seed: int,
                           split: Split = "train", image_format: Literal["jpg", "png"] = "jpg",
                           aspects: tuple[Aspect, ...] = SQUARE) -> dict:
    """Generate `num_samples` scenes into tar shards of `shard_size` samples; returns the ``shards.json`` index.

    aspects: canvas shapes, cycled by sample index (default square R x R)."""
    if num_samples <= 0 or shard_size <= 0 or resolution < 8:
        raise ValueError("num_samples and shard_size must be > 0 and resolution >= 8 pixels")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta: dict = {"generator": "synthetic", "split": split, "seed": seed, "resolution": resolution}
    if aspects != SQUARE:
        meta["aspects"] = [f"{w}:{h}" for w, h in aspects]
    with ShardWriter(Path(out_dir), shard_size=shard_size, meta=meta) as writer:
        for index in range(num_samples):
            writer.write(*make_sample(index, seed, split, resolution, image_format, aspects))
    return json.loads((Path(out_dir) / "shards.json").read_text())
