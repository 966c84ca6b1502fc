"""The on-disk format of precomputed-conditioning shards, shared by the writer (precompute.py) and the reader.

A precompute output directory mirrors its source shards one to one:

    OUT/NAME.tar          one per source shard NAME.tar (same file name), holding for every source sample, in the
                          same order and under the same key, the members ``KEY.<array>.npy`` (``np.save`` bytes,
                          one per array, no pickles) and ``KEY.source_crc32`` (8 hex digits: a CRC-32 of the
                          source sample's members, which the reader compares, so that a source sample edited in
                          place - e.g. re-captioned under the same key - stops the run instead of training on
                          stale arrays) - and nothing of the image or caption. A sample that an
                          encoder could not encode (unreadable caption or image, the reasons the reader counts)
                          keeps its place: it holds the arrays that could be computed plus ``KEY.skip``, UTF-8
                          JSON {"reason", "detail", "arrays": [names not written]}. So both shards always hold
                          the same keys at the same in-shard indices and are zipped by index, which is also what
                          exact resume and the sample-index split of small datasets rely on.
    OUT/shards.json       the index (below), written once every part has finished.
    OUT/shards.part-I.json   progress of part I of --num-parts P (rewritten after each finished shard).

shards.json::

    format "pipeline-precomputed", version 1, num_parts
    shards   [{url: NAME.tar, num_samples, num_bytes, skipped: {reason: n}}]  (output shards, source order)
    num_shards, num_samples
    source   [{name, num_samples, num_bytes}]  the source shards it was computed from, and
    source_fingerprint                         a hash of that list
    arrays   {name: {dtype, shape, encoder}}   per-sample dtype and shape; an array computed per aspect-ratio
                                               bucket (``--buckets-config``) has null for the sides that follow
                                               its bucket (e.g. [4, null, null]) and ``buckets``: [[H, W], ...],
                                               the image shapes; its encoder also writes CROP_ARRAY
    encoders [{spec, name, ...}]               what computed them; caption_key: where captions came from
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.sources import local_path
from pipeline.errors import DataError

INDEX_NAME = "shards.json"
INDEX_FORMAT = "pipeline-precomputed"
INDEX_VERSION = 1
SKIP_MEMBER = "skip"
DIGEST_MEMBER = "source_crc32"
# int64 (6,) per sample of a bucketed precompute: the crop its arrays were made from, (orig height, orig width,
# crop top, crop left, target height, target width) as transforms.Crop; the reader batches by it.
CROP_ARRAY = "bucket_crop"
# Settings every part of one precompute must share (checked when parts are merged or a run is restarted).
SHARED_FIELDS = ("num_parts", "source_files", "arrays", "encoders", "caption_key")
_PART_NAME = re.compile(r"^shards\.part-(\d+)\.json$")
_TAR_IN_COMMAND = re.compile(r"([^/\s'\"]+\.tar)(?![^\s'\"])")


def array_member(name: str) -> str:
    """Member extension of array `name` inside a precomputed shard: ``KEY.<name>.npy``."""
    return f"{name}.npy"


def source_digest(members: dict[str, bytes]) -> bytes:
    """CRC-32 of a source sample's members (extension and bytes, in extension order) as 8 hex digits (ASCII)."""
    crc = 0
    for ext in sorted(members):
        crc = zlib.crc32(members[ext], zlib.crc32(ext.encode("utf-8") + b"\0", crc))
    return f"{crc:08x}".encode("ascii")


def part_index_name(part: int) -> str:
    return f"shards.part-{part}.json"


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` bytes of one array (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    """The array in ``np.save`` bytes; never unpickles."""
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def shard_name(url: str) -> str:
    """The file name a shard url is matched by: ``dir/shard-000001.tar`` and
    ``pipe:curl -s https://host/shard-000001.tar`` are both ``shard-000001.tar``."""
    if url.startswith("pipe:"):
        found = _TAR_IN_COMMAND.findall(url)
        if found:
            return found[-1]
    return os.path.basename(url.rstrip("/"))


def source_fingerprint(source: list[dict[str, Any]]) -> str:
    """Hash of the source shards' names, sample counts and byte sizes (in order)."""
    rows = [[s["name"], s["num_samples"], s["num_bytes"]] for s in source]
    return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, obj: dict, tag: str = "") -> None:
    """Write JSON via a temporary file + rename; `tag` keeps concurrent writers' temp files apart."""
    tmp = path.with_name(f"{path.name}.tmp{tag}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} is not a JSON object")
    return value


def _check_format(index: dict, path: Path) -> None:
    if index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path} is not a precomputed-shards index (no format {INDEX_FORMAT!r}); point "
                        f"data.precomputed_urls at the --out directory of `python -m pipeline shards precompute`")
    if index.get("version") != INDEX_VERSION:
        raise DataError(f"{path} has precomputed-index version {index.get('version')}, this code reads "
                        f"version {INDEX_VERSION}; re-run the precompute")


def read_parts(out_dir: Path) -> dict[int, dict]:
    """All ``shards.part-I.json`` files in `out_dir` by part number (format-checked)."""
    parts = {}
    for path in sorted(out_dir.glob("shards.part-*.json")):
        match = _PART_NAME.match(path.name)
        if match:
            part = _read_json(path)
            _check_format(part, path)
            parts[int(match.group(1))] = part
    return parts


def merge_parts(out_dir: Path) -> dict:
    """The shards.json content assembled from every part's progress file.

    Raises:
        DataError: no part files, a part missing or unfinished, or parts with different settings.
    """
    parts = read_parts(out_dir)
    if not parts:
        raise DataError(f"{out_dir} holds no {INDEX_NAME} and no shards.part-*.json: not a precompute output "
                        f"directory (or no part has started)")
    first = parts[min(parts)]
    num_parts = int(first["num_parts"])
    for number, part in sorted(parts.items()):
        differs = [f for f in SHARED_FIELDS if part.get(f) != first.get(f)]
        if differs:
            raise DataError(f"{out_dir}/{part_index_name(number)} and {part_index_name(min(parts))} were run with "
                            f"different {', '.join(differs)}: every part of one precompute needs the same SRC, "
                            f"--encoder list, --caption-key and --num-parts")
    unfinished = [p for p in range(num_parts) if not parts.get(p, {}).get("complete")]
    if unfinished:
        raise DataError(f"the precompute in {out_dir} is incomplete: part(s) {unfinished} of {num_parts} have not "
                        f"finished (see their shards.part-I.json); run them with --num-parts {num_parts} --part I")
    done = {e["url"]: e for part in parts.values() for e in part["shards"]}
    entries, source = [], []
    for file in first["source_files"]:
        entry = done.get(file["name"])
        if entry is None:
            raise DataError(f"the precompute in {out_dir} has no entry for source shard {file['name']}")
        entries.append({k: entry[k] for k in ("url", "num_samples", "num_bytes", "skipped")})
        source.append({"name": file["name"], "num_samples": entry["num_samples"], "num_bytes": file["num_bytes"]})
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "num_parts": num_parts, "shards": entries,
            "num_shards": len(entries), "num_samples": sum(e["num_samples"] for e in entries),
            "source": source, "source_fingerprint": source_fingerprint(source), "arrays": first["arrays"],
            "encoders": first["encoders"], "caption_key": first["caption_key"]}


def load_index(out_dir: Path) -> dict:
    """A precompute directory's index: its shards.json, or (before --finalize) the merge of its part files."""
    path = out_dir / INDEX_NAME
    if path.is_file():
        index = _read_json(path)
        _check_format(index, path)
        return index
    return merge_parts(out_dir)


def source_counts(urls: list[str]) -> dict[str, int]:
    """Sample counts by shard name from the ``shards.json`` (ShardWriter format) next to local source shards.

    Only entries for the given urls count; shards without such an index are absent from the result.
    """
    wanted: dict[Path, set[str]] = {}
    for url in urls:
        path = local_path(url)
        if path is not None:
            wanted.setdefault(Path(path).parent, set()).add(Path(path).name)
    counts: dict[str, int] = {}
    for directory, names in sorted(wanted.items()):
        path = directory / INDEX_NAME
        if not path.is_file():
            continue
        index = _read_json(path)
        entries = index.get("shards", []) if index.get("format") != INDEX_FORMAT else []
        for entry in entries:
            if isinstance(entry, dict) and os.path.basename(str(entry.get("url", ""))) in names:
                counts[os.path.basename(str(entry["url"]))] = int(entry["num_samples"])
    return counts
