"""Turning one raw sample into (uint8 image, caption) and a list of those into a batch dict (see spec.py).

Speed matters (the loader must never starve GPUs): JPEGs are decoded at reduced scale with PIL ``draft()``
(the DCT does most of the downscaling), the crop and the resize happen in one ``Image.resize(box=...)`` call,
images stay uint8 all the way to the device (normalised there, see spec.normalize_images), and torchvision is
not involved.

Every rejection raises :class:`SkipSample` with a reason name; the caller counts it and carries on.
"""
from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.data.spec import SampleSpec

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
RESERVED_KEYS = ("image", "caption", "key", "loss_mask")
MASK_MEMBER = "mask.png"  # KEY.mask.png: the optional per-pixel loss weight of a sample
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


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
        # PIL names the BytesIO object with its memory address: drop it, so that notes are reproducible.
        raise SkipSample("corrupt_image", f"cannot decode image ({_ADDRESS.sub('', str(exc))})") from None


def decode_mask(members: dict[str, bytes], opts: ImageOptions, crop_seed: int) -> np.ndarray:
    """The sample's loss mask -> uint8 (S, S), cropped and resized exactly as decode_image crops its image (same
    crop_seed; the box is taken in the mask's own pixels, so a mask at another scale of the image works); 255
    everywhere when the sample has no MASK_MEMBER."""
    data = members.get(MASK_MEMBER)
    if data is None:
        return np.full((opts.size, opts.size), 255, np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = Image.open(io.BytesIO(data))
            image_size = Image.open(io.BytesIO(image_bytes(members))).size  # header only
            width, height = mask.size
            if min(width, height) <= 0 or abs(width * image_size[1] - height * image_size[0]) > max(width, height):
                raise SkipSample("corrupt_mask", f"mask {width}x{height} does not have the aspect ratio of the "
                                                 f"image {image_size[0]}x{image_size[1]}")
            box = _crop_box(width, height, opts, crop_seed)
            return np.asarray(mask.convert("L").resize((opts.size, opts.size), Image.BILINEAR, box=box))
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        raise SkipSample("corrupt_mask", f"cannot decode {MASK_MEMBER} ({_ADDRESS.sub('', str(exc))})") from None


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A tensor to fill (in shared memory when `shared`) and a numpy view of it."""
    result = torch.empty(shape, dtype=dtype)
    if shared:
        result.share_memory_()
    return result, result.numpy()


def image_batch(images: list[np.ndarray], shared: bool = False) -> torch.Tensor:
    """B uint8 arrays (S, S, 3) -> one uint8 tensor (B, 3, S, S) (channels first, not normalised).

    shared: allocate the result in shared memory, so that a DataLoader worker hands it to the training process
    without copying it once more. uint8 rather than float32 because first-touching fresh shared memory costs
    ~7 us per 4 KiB page on the development VM: a float32 batch at 256 px (50 MB for B = 64) cost as much as
    decoding its JPEGs; normalisation happens on the device (spec.normalize_images).
    """
    size = images[0].shape[0]
    result, out = _empty((len(images), 3, size, size), torch.uint8, shared)
    for i, image in enumerate(images):
        out[i] = image.transpose(2, 0, 1)  # HWC -> CHW, one strided copy per image
    return result


def stack_arrays(name: str, arrays: list[np.ndarray], shared: bool = False) -> torch.Tensor:
    """B equal-shaped arrays -> tensor (B, *shape) in their own dtype (float16 stays float16, bool stays bool)."""
    first = arrays[0]
    dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
    result, out = _empty((len(arrays), *first.shape), dtype, shared)
    for i, array in enumerate(arrays):
        if array.shape != first.shape or array.dtype != first.dtype:
            raise ValueError(f"precomputed array {name!r}: sample {i} has {array.dtype} {array.shape}, "
                             f"sample 0 has {first.dtype} {first.shape}")
        out[i] = array
    return result


def collate(images: list[np.ndarray], captions: list[str], keys: list[str], spec: SampleSpec,
            shared: bool = False, arrays: dict[str, list[np.ndarray]] | None = None) -> dict:
    """Build the batch dict of spec.py.

    images: B arrays (S, S, 3) uint8 (ignored when spec.image_size == 0).
    arrays: per name in spec.precomputed, B arrays of one shape and dtype; "loss_mask": B uint8 (S, S) masks
    (spec.loss_mask).
    shared: put the tensors in shared memory (in DataLoader workers; see image_batch).
    Returns {"image": uint8 (B, 3, S, S), "caption", "key", **spec.tokenize(captions), name: (B, *shape)}.
    """
    batch: dict = {}
    if spec.image_size:
        batch["image"] = image_batch(images, shared)
    batch["caption"] = captions
    batch["key"] = keys
    for name in spec.precomputed:
        batch[name] = stack_arrays(name, (arrays or {})[name], shared)
    if spec.loss_mask and spec.image_size:
        batch["loss_mask"] = stack_arrays("loss_mask", (arrays or {})["loss_mask"], shared)[:, None]
    if spec.tokenize is not None:
        tokens = spec.tokenize(captions)
        clash = set(tokens) & (set(RESERVED_KEYS) | set(spec.precomputed))
        if clash:
            raise ValueError(f"SampleSpec.tokenize returned batch keys {sorted(clash)} that are reserved or "
                             f"SampleSpec.precomputed arrays")
        batch.update(tokens)
    return batch
