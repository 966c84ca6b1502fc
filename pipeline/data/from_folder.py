"""Pack an img2dataset-style folder (``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` [+ ``KEY.json``]) into tar shards.

Files are grouped by folder and name without the last extension; nested folders are allowed. The sample key is
the relative path of that stem with '/', '.' and whitespace replaced by '_' (webdataset splits names at the
first dot), made unique with a numeric suffix when two stems map to the same key. Samples are written in sorted
path order, so the same folder always gives byte-identical shards.

Image bytes are stored as they are (original pixels, EXIF and all; the reader applies the orientation and
crops). With ``max_side`` an image whose long side is larger is shrunk to it (never enlarged): turned upright
first (re-encoding drops EXIF), resampled with Lanczos, re-encoded in its own format (JPEG quality 95, PNG and
WebP lossless); such samples are counted under ``shrunk`` in the index.

Files that cannot be used are counted by reason (they never stop the packing):
    unknown_extension (per file), duplicate_image (a second image for one stem; the first in
    jpg > jpeg > png > webp order is kept), missing_image, missing_caption, empty_caption,
    bad_caption_encoding, empty_image, corrupt_image, bad_json (per sample).
"""
from __future__ import annotations

import io
import json
import re
import warnings
from collections import Counter
from pathlib import Path

from PIL import Image, ImageOps

from pipeline.data.shard_writer import ShardWriter
from pipeline.data.transforms import IMAGE_EXTS
from pipeline.errors import DataError, UsageError

CAPTION_EXTS = ("txt", "json")
_UNSAFE = re.compile(r"[\s./\\]+")


def scan_folder(src: Path, exclude: Path | None = None) -> tuple[dict[str, dict[str, Path]], Counter]:
    """Group the files below `src` by stem -> ({relative stem: {ext: path}}, {reason: count})."""
    groups: dict[str, dict[str, Path]] = {}
    skipped: Counter = Counter()
    src = src.resolve()  # so that `exclude` (resolved) can be recognised among the parents
    for path in sorted(src.rglob("*")):
        if not path.is_file() or (exclude is not None and exclude in path.parents):
            continue
        ext = path.suffix[1:].lower()
        if path.name.startswith(".") or ext not in IMAGE_EXTS + CAPTION_EXTS:
            skipped["unknown_extension"] += 1
            continue
        stem = path.relative_to(src).with_suffix("").as_posix()
        members = groups.setdefault(stem, {})
        if ext in IMAGE_EXTS and any(e in members for e in IMAGE_EXTS):
            skipped["duplicate_image"] += 1
            kept = next(e for e in IMAGE_EXTS if e in members)
            if IMAGE_EXTS.index(ext) < IMAGE_EXTS.index(kept):
                del members[kept]
                members[ext] = path
            continue
        members[ext] = path
    return groups, skipped


def _check_image(data: bytes) -> str | None:
    """A skip reason for unusable image bytes, else None. Decodes fully (at reduced scale for JPEG)."""
    if not data:
        return "empty_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (64, 64))  # a truncated or corrupt JPEG still fails, 10x faster than full size
                img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
        return "corrupt_image"
    return None


_SAVE = {"jpg": ("JPEG", {"quality": 95}), "jpeg": ("JPEG", {"quality": 95}), "png": ("PNG", {}),
         "webp": ("WEBP", {"lossless": True})}


def shrink_image(data: bytes, ext: str, max_side: int) -> bytes | None:
    """`data` with its long side shrunk to `max_side` (upright, same format), or None when it is not larger."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as img:
            if max(img.size) <= max_side:
                return None
            img = ImageOps.exif_transpose(img)
            scale = max_side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            fmt, options = _SAVE[ext]
            if img.mode in ("P", "PA", "1"):  # PIL resizes these with nearest neighbour only: blocky
                img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
            if fmt == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
                img = img.convert("RGB")
            small = img.resize(size, Image.LANCZOS)
            buf = io.BytesIO()
            small.save(buf, fmt, **options)
            return buf.getvalue()


def _sample_members(members: dict[str, Path], max_side: int = 0) -> tuple[dict[str, bytes] | None, str | None]:
    """(the bytes to store for one stem, None or "shrunk" when max_side made its image smaller), or
    (None, reason) when it cannot be used."""
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return None, "missing_image"
    if "txt" not in members:
        return None, "missing_caption"
    caption = members["txt"].read_bytes()
    try:
        text = caption.decode("utf-8")
    except UnicodeDecodeError:
        return None, "bad_caption_encoding"
    if not text.strip():
        return None, "empty_caption"
    out = {"txt": caption}
    if "json" in members:
        out["json"] = members["json"].read_bytes()
        try:
            json.loads(out["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None, "bad_json"
    image = members[image_ext].read_bytes()
    reason = _check_image(image)
    if reason is not None:
        return None, reason
    smaller = shrink_image(image, image_ext.lower(), max_side) if max_side else None
    out[image_ext] = image if smaller is None else smaller
    return out, None if smaller is None else "shrunk"


def _unique_key(stem: str, used: set[str]) -> str:
    base = _UNSAFE.sub("_", stem).strip("_") or "sample"
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def pack_folder(src: str | Path, out: str | Path, shard_size: int = 1000, max_shard_bytes: int = 0,
                max_side: int = 0) -> dict:
    """Write the usable samples of `src` as shards + ``shards.json`` in `out`; returns the index.

    max_side: pixels; a larger long side is shrunk to it (0 = keep every image's bytes as they are).
    The index holds ``skipped`` ({reason: count}), ``shrunk`` (images made smaller) and ``source``. Raises
    DataError when nothing is usable, UsageError for a missing source folder or bad sizes.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory")
    if shard_size <= 0 or max_shard_bytes < 0 or max_side < 0:
        raise UsageError("--shard-size must be > 0, --max-shard-bytes and --max-side >= 0")
    groups, skipped = scan_folder(src, exclude=out.resolve() if out.resolve() != src.resolve() else None)
    used: set[str] = set()
    meta: dict = {"generator": "from-folder", "source": str(src)}
    with ShardWriter(out, shard_size=shard_size, max_shard_bytes=max_shard_bytes, meta=meta) as writer:
        written = shrunk = 0
        for stem in sorted(groups):
            members, reason = _sample_members(groups[stem], max_side)
            if members is None:
                skipped[reason] += 1
                continue
            shrunk += reason == "shrunk"
            writer.write(_unique_key(stem, used), members)
            written += 1
        if written == 0:
            detail = ", ".join(f"{r}={n}" for r, n in sorted(skipped.items())) or "the folder is empty"
            raise DataError(f"no usable samples in {src} (skipped: {detail}); expected KEY.jpg|jpeg|png|webp "
                            f"with KEY.txt next to it")
        meta["skipped"] = dict(sorted(skipped.items()))
        meta["shrunk"] = shrunk
    return json.loads((out / "shards.json").read_text(encoding="utf-8"))
