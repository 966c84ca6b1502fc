"""Turning one raw sample into (uint8 image, caption) and a list of those into a batch dict (see spec.py).

Speed matters (the loader must never starve GPUs): JPEGs are decoded at reduced scale with PIL ``draft()``
(the DCT does most of the downscaling), the crop and the resize happen in one ``Image.resize(box=...)`` call,
images stay uint8 all the way to the device (normalised there, see spec.normalize_images), and torchvision is
not involved.

Real images are normalised on the way in: the EXIF orientation is applied (a phone photo is trained upright),
16-bit greyscale is scaled to 8 bits (not clipped), greyscale / palette / CMYK become RGB and transparency is
composited on white (the colour hidden under a transparent pixel is not shown).

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
from PIL.Image import Transpose

from pipeline.data.buckets import nearest_bucket
from pipeline.data.spec import SampleSpec

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
RESERVED_KEYS = ("image", "caption", "key", "loss_mask", "orig_size", "crop_top_left", "target_size")
MASK_MEMBER = "mask.png"  # KEY.mask.png: the optional per-pixel loss weight of a sample
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
DEFAULT_MIN_IMAGE_SIZE = 32  # pixels; the short-side floor when data.min_image_size is left at -1 (auto)
_EXIF_ORIENTATION = 0x0112
# EXIF orientation value -> the transpose that shows the image upright (values 5..8 swap width and height).
_ORIENT = {2: Transpose.FLIP_LEFT_RIGHT, 3: Transpose.ROTATE_180, 4: Transpose.FLIP_TOP_BOTTOM,
           5: Transpose.TRANSPOSE, 6: Transpose.ROTATE_270, 7: Transpose.TRANSVERSE, 8: Transpose.ROTATE_90}
_WHITE = (255, 255, 255, 255)


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the name it is counted under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    """How images are checked and cropped. Sizes in pixels; min_image_size 0 and max_aspect_ratio 0 = no limit.

    buckets: (height, width) output shapes ordered by aspect ratio (see buckets.py); an image goes to the one of
        nearest aspect ratio. Empty: every image becomes size x size.
    """

    size: int
    random_crop: bool
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0
    buckets: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Crop:
    """Where an output image came from (SDXL's size and crop conditioning), all in pixels.

    orig_height/orig_width: the image as shown (after EXIF orientation), before resizing;
    crop_top/crop_left: offset of the output inside the image resized to cover it;
    height/width: the output (the bucket's shape); bucket: its index in ImageOptions.buckets (0 without).
    """

    bucket: int
    orig_height: int
    orig_width: int
    crop_top: int
    crop_left: int
    height: int
    width: int


def auto_min_image_size(configured: int, size: int) -> int:
    """data.min_image_size resolved: -1 (auto) -> DEFAULT_MIN_IMAGE_SIZE, but never above the output size S."""
    return configured if configured >= 0 else min(DEFAULT_MIN_IMAGE_SIZE, size)


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


def _crop_box(width: int, height: int, out_h: int, out_w: int, random_crop: bool,
              crop_seed: int) -> tuple[tuple[float, float, float, float], int, int, float]:
    """The least crop of a `width` x `height` image resized to cover out_w x out_h.

    Returns (box in source pixels that becomes the output, offset x, offset y (output scale), scale).
    For a square output the scale is out / short side, as it always was (max picks that same quotient).
    """
    scale = max(out_w / width, out_h / height)
    room_x = max(0, round(width * scale) - out_w)  # free pixels along the long side, in output scale
    room_y = max(0, round(height * scale) - out_h)
    if random_crop:
        off_x, off_y = crop_seed % (room_x + 1), (crop_seed >> 32) % (room_y + 1)
    else:
        off_x, off_y = room_x // 2, room_y // 2
    return (off_x / scale, off_y / scale, (off_x + out_w) / scale, (off_y + out_h) / scale), off_x, off_y, scale


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1 = stored upright, also when absent or unreadable)."""
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, TypeError, SyntaxError):
        return 1  # a broken EXIF block is not a broken image
    return value if value in _ORIENT else 1


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """`img` turned the way its EXIF orientation says it is shown."""
    return img.transpose(_ORIENT[orientation]) if orientation in _ORIENT else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (loaded): 16/32-bit greyscale scaled by 1/257 (65535 -> 255, not clipped at 255),
    alpha and palette/greyscale transparency composited on white, L/P/CMYK/1 converted."""
    mode = img.mode
    if mode == "RGB":
        img.load()
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # PIL's own I;16 -> L conversion clips at 255: a 46% grey (30146) came out pure white.
        grey = np.asarray(img).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((grey * 2 + 257) // 514).astype(np.uint8), "L").convert("RGB")  # round(v / 257)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size, _WHITE)
        out.alpha_composite(rgba)
        return out.convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, opts: ImageOptions, crop_seed: int) -> np.ndarray:
    """Decode, filter, crop and resize one image -> uint8 array (S, S, 3), S = opts.size (or (H, W, 3) of its
    bucket with opts.buckets).

    crop_seed: 64-bit integer choosing the random crop offsets (ignored for center crops).
    """
    return decode_with_crop(data, opts, crop_seed)[0]


def decode_with_crop(data: bytes, opts: ImageOptions, crop_seed: int) -> tuple[np.ndarray, Crop]:
    """decode_image, plus where the output came from (its bucket, original size and crop offsets)."""
    if not data:
        raise SkipSample("empty_image", "image member has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency or EXIF warnings: noise per sample
            img = Image.open(io.BytesIO(data))
            orientation = exif_orientation(img)
            stored_w, stored_h = img.size
            width, height = (stored_h, stored_w) if orientation >= 5 else (stored_w, stored_h)  # as shown
            short, long = min(width, height), max(width, height)
            if short <= 0:
                raise SkipSample("corrupt_image", f"image size {width}x{height}")
            if opts.min_image_size and short < opts.min_image_size:
                raise SkipSample("image_too_small", f"{width}x{height}, short side < {opts.min_image_size}")
            if opts.max_aspect_ratio and long / short > opts.max_aspect_ratio:
                raise SkipSample("bad_aspect_ratio", f"{width}x{height} exceeds {opts.max_aspect_ratio}")
            if opts.buckets:
                bucket = nearest_bucket(width, height, opts.buckets)
                out_h, out_w = opts.buckets[bucket]
            else:
                bucket, out_h, out_w = 0, opts.size, opts.size
            box, off_x, off_y, scale = _crop_box(width, height, out_h, out_w, opts.random_crop, crop_seed)
            # JPEG: decode at 1/2, 1/4 or 1/8 scale, never smaller than the resized (pre-crop) image.
            img.draft("RGB", (max(1, round(stored_w * scale)), max(1, round(stored_h * scale))))
            img = upright(to_rgb(img), orientation)
            factor = img.size[0] / width
            # (off + out) / scale can come out a rounding error past the edge, which PIL refuses: clamp.
            box = (box[0] * factor, box[1] * factor, min(box[2] * factor, float(img.size[0])),
                   min(box[3] * factor, float(img.size[1])))
            if img.size != (out_w, out_h) or box != (0.0, 0.0, float(out_w), float(out_h)):
                img = img.resize((out_w, out_h), Image.BICUBIC, box=box)
            return np.asarray(img), Crop(bucket, height, width, off_y, off_x, out_h, out_w)
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        # PIL names the BytesIO object with its memory address: drop it, so that notes are reproducible.
        raise SkipSample("corrupt_image", f"cannot decode image ({_ADDRESS.sub('', str(exc))})") from None


def decode_mask(members: dict[str, bytes], crop: Crop) -> np.ndarray:
    """The sample's loss mask -> uint8 (H, W) of its image's output, cropped and resized exactly as
    decode_with_crop cropped the image (`crop`, its result; the box is taken in the mask's own pixels, so a mask at
    another scale of the image works; masks are in the image's upright orientation); 255 everywhere when the
    sample has no MASK_MEMBER."""
    data = members.get(MASK_MEMBER)
    if data is None:
        return np.full((crop.height, crop.width), 255, np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = Image.open(io.BytesIO(data))
            width, height = mask.size
            if min(width, height) <= 0 or abs(width * crop.orig_height - height * crop.orig_width) > max(width,
                                                                                                          height):
                raise SkipSample("corrupt_mask", f"mask {width}x{height} does not have the aspect ratio of the "
                                                 f"image {crop.orig_width}x{crop.orig_height}")
            scale = max(crop.width / crop.orig_width, crop.height / crop.orig_height) * crop.orig_width / width
            box = (crop.crop_left / scale, crop.crop_top / scale, min((crop.crop_left + crop.width) / scale, width),
                   min((crop.crop_top + crop.height) / scale, height))
            return np.asarray(mask.convert("L").resize((crop.width, crop.height), Image.BILINEAR, box=box))
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
    """B uint8 arrays (H, W, 3) of one shape -> one uint8 tensor (B, 3, H, W) (channels first, not normalised).

    shared: allocate the result in shared memory, so that a DataLoader worker hands it to the training process
    without copying it once more. uint8 rather than float32 because first-touching fresh shared memory costs
    ~7 us per 4 KiB page on the development VM: a float32 batch at 256 px (50 MB for B = 64) cost as much as
    decoding its JPEGs; normalisation happens on the device (spec.normalize_images).
    """
    height, width = images[0].shape[:2]
    result, out = _empty((len(images), 3, height, width), torch.uint8, shared)
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


def crop_batch(crops: list[Crop]) -> dict[str, torch.Tensor]:
    """B Crops -> {"orig_size", "crop_top_left", "target_size"}: int64 (B, 2) each, (height, width) / (top, left)."""
    def pairs(a: str, b: str) -> torch.Tensor:
        return torch.tensor([[getattr(c, a), getattr(c, b)] for c in crops], dtype=torch.int64)
    return {"orig_size": pairs("orig_height", "orig_width"), "crop_top_left": pairs("crop_top", "crop_left"),
            "target_size": pairs("height", "width")}


def collate(images: list[np.ndarray], captions: list[str], keys: list[str], spec: SampleSpec,
            shared: bool = False, arrays: dict[str, list[np.ndarray]] | None = None,
            crops: list[Crop] | None = None) -> dict:
    """Build the batch dict of spec.py.

    images: B arrays (H, W, 3) uint8 of one shape (ignored when spec.image_size == 0; all None when the images
        were not decoded: then the batch has no "image").
    arrays: per name in spec.precomputed, B arrays of one shape and dtype; "loss_mask": B uint8 (H, W) masks
    (spec.loss_mask).
    crops: with buckets, where each image came from (adds crop_batch's three int64 (B, 2) tensors).
    shared: put the tensors in shared memory (in DataLoader workers; see image_batch).
    Returns {"image": uint8 (B, 3, H, W), "caption", "key", **spec.tokenize(captions), name: (B, *shape)}.
    """
    batch: dict = {}
    if spec.image_size and images[0] is not None:  # None: not decoded (spec.decode_image, per-bucket arrays)
        batch["image"] = image_batch(images, shared)
    if crops is not None:
        batch.update(crop_batch(crops))
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
