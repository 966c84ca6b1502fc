"""Turning one raw sample into (uint8 image, caption) and a list of those into a batch dict (see spec.py).

Speed matters (the loader must never starve GPUs): JPEGs are decoded at reduced scale with PIL ``draft()``
(the DCT does most of the downscaling), the crop and the resize happen in one ``Image.resize(box=...)`` call,
images stay uint8 until the whole batch is normalised in one vectorised op, and torchvision is not involved.

Every rejection raises :class:`SkipSample` with a reason name; the caller counts it and carries on.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.data.spec import SampleSpec

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
RESERVED_KEYS = ("image", "caption", "key")


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the name it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    """How images are checked and cropped. Sizes in pixels; max_aspect_ratio 0 = no limit."""

    size: int
    random_crop: bool
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0


def read_caption(members: dict[str, bytes], caption_key: str) -> str:
    """The caption from ``txt`` or from field F of ``json`` (caption_key ``'json:F'``), stripped."""
    if caption_key == "txt":
        if "txt" not in members:
            raise SkipSample("missing_caption", "no .txt member")
        try:
            text = members["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SkipSample("bad_caption_encoding", f".txt is not UTF-8 ({exc.reason} at byte {exc.start})")
    else:
        field = caption_key[5:]
        if "json" not in members:
            raise SkipSample("missing_caption", "no .json member")
        try:
            value = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SkipSample("bad_json", f".json cannot be parsed ({exc})")
        text = value.get(field) if isinstance(value, dict) else None
        if not isinstance(text, str):
            raise SkipSample("missing_caption", f".json has no string field {field!r}")
    text = text.strip()
    if not text:
        raise SkipSample("empty_caption", "caption is empty")
    return text


def image_bytes(members: dict[str, bytes]) -> bytes:
    """The first image member in IMAGE_EXTS order."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return members[ext]
    raise SkipSample("missing_image", f"no image member (one of {', '.join(IMAGE_EXTS)})")


def _crop_box(width: int, height: int, opts: ImageOptions, crop_seed: int) -> tuple[float, float, float, float]:
    """Box in source pixels that becomes the S x S output after the short side is scaled to S."""
    size = opts.size
    scale = size / min(width, height)
    room_x = max(0, round(width * scale) - size)  # free pixels along the long side, in output scale
    room_y = max(0, round(height * scale) - size)
    if opts.random_crop:
        off_x, off_y = crop_seed % (room_x + 1), (crop_seed >> 32) % (room_y + 1)
    else:
        off_x, off_y = room_x // 2, room_y // 2
    return off_x / scale, off_y / scale, (off_x + size) / scale, (off_y + size) / scale


def decode_image(data: bytes, opts: ImageOptions, crop_seed: int) -> np.ndarray:
    """Decode, filter, crop and resize one image -> uint8 array (S, S, 3), S = opts.size.

    crop_seed: 64-bit integer choosing the random crop offsets (ignored for center crops).
    """
    if not data:
        raise SkipSample("empty_image", "image member has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency or EXIF warnings: noise per sample
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            short, long = min(width, height), max(width, height)
            if short <= 0:
                raise SkipSample("corrupt_image", f"image size {width}x{height}")
            if opts.min_image_size and short < opts.min_image_size:
                raise SkipSample("image_too_small", f"{width}x{height}, short side < {opts.min_image_size}")
            if opts.max_aspect_ratio and long / short > opts.max_aspect_ratio:
                raise SkipSample("bad_aspect_ratio", f"{width}x{height} exceeds {opts.max_aspect_ratio}")
            box = _crop_box(width, height, opts, crop_seed)
            scale = opts.size / short
            # JPEG: decode at 1/2, 1/4 or 1/8 scale, never smaller than the resized (pre-crop) image.
            img.draft("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
            if img.mode != "RGB":
                img = img.convert("RGB")
            else:
                img.load()
            factor = img.size[0] / width
            box = tuple(v * factor for v in box)
            if img.size != (opts.size, opts.size) or box != (0.0, 0.0, float(opts.size), float(opts.size)):
                img = img.resize((opts.size, opts.size), Image.BICUBIC, box=box)
            return np.asarray(img)
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        raise SkipSample("corrupt_image", f"cannot decode image ({exc})") from None


def normalise(images: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...],
              shared: bool = False) -> torch.Tensor:
    """B uint8 arrays (S, S, 3) -> float32 tensor (B, 3, S, S) holding (x / 255 - mean) / std per channel.

    The arithmetic runs in numpy, not torch: on the CPU workers a per-image cast-transpose-copy plus a
    multiply-add is several times faster than torch's permute/contiguous/float/div/sub chain (measured).
    shared: allocate the result in shared memory, so that a DataLoader worker hands it to the training process
    without copying it once more (a float32 batch at 256 px is 50 MB for B = 64). Otherwise numpy allocates:
    it asks for transparent huge pages, which makes first-touch page faults ~3x cheaper than torch.empty's.
    """
    size = images[0].shape[0]
    std_arr = np.asarray(std, np.float32).reshape(3, 1, 1)
    scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
    shift = (np.asarray(mean, np.float32).reshape(3, 1, 1) / std_arr).astype(np.float32)
    shape = (len(images), 3, size, size)
    if shared:
        result = torch.empty(shape, dtype=torch.float32).share_memory_()
        out = result.numpy()
    else:
        out = np.empty(shape, np.float32)
        result = torch.from_numpy(out)
    for i, image in enumerate(images):  # per image, while its planes are still in cache
        plane = out[i]
        plane[...] = image.transpose(2, 0, 1)  # uint8 HWC -> float32 CHW in one pass
        plane *= scale
        plane -= shift
    return result


def collate(images: list[np.ndarray], captions: list[str], keys: list[str], spec: SampleSpec,
            shared: bool = False) -> dict:
    """Build the batch dict of spec.py.

    images: B arrays (S, S, 3) uint8 (ignored when spec.image_size == 0).
    shared: put the image tensor in shared memory (in DataLoader workers; see normalise).
    Returns {"image": float32 (B, 3, S, S) normalised, "caption", "key", **spec.tokenize(captions)}.
    """
    batch: dict = {}
    if spec.image_size:
        batch["image"] = normalise(images, spec.image_mean, spec.image_std, shared)
    batch["caption"] = captions
    batch["key"] = keys
    if spec.tokenize is not None:
        tokens = spec.tokenize(captions)
        clash = set(tokens) & set(RESERVED_KEYS)
        if clash:
            raise ValueError(f"SampleSpec.tokenize returned reserved batch keys {sorted(clash)}")
        batch.update(tokens)
    return batch
