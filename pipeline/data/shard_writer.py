"""Writing WebDataset tar shards: deterministic bytes, atomic files, and a ``shards.json`` index.

A sample is a key plus ``{extension: bytes}`` (e.g. ``{"jpg": ..., "txt": ..., "json": ...}``); its members
are stored as ``KEY.EXT`` so webdataset groups them back into one sample. Each shard is written to a temporary
name and renamed when complete, so an interrupted run never leaves a truncated shard under a final name, and
``shards.json`` is written last, listing only complete shards with their sample counts.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

INDEX_NAME = "shards.json"


@dataclass
class ShardInfo:
    """One finished shard: file name (relative to the output dir), samples and bytes in it."""

    url: str
    num_samples: int
    num_bytes: int


def add_members(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """Append one sample as members ``KEY.EXT`` (sorted by EXT) with fixed metadata: same samples -> same bytes."""
    for ext in sorted(members):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))


class TarShard:
    """One tar shard with a given file name, written under ``NAME.tmp`` and renamed by close(), so a reader
    never sees a partial shard under the final name. PAX format: long sample keys from other tools still fit.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self.num_samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample (key as in the source shard, e.g. ``dir/KEY``; no checks beyond tarfile's)."""
        add_members(self._tar, key, members)
        self.num_samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()
        self._tmp.replace(self.path)
        return ShardInfo(self.path.name, self.num_samples, self.path.stat().st_size)

    def abort(self) -> None:
        """Drop the partial shard (nothing appears under the final name)."""
        self._tar.close()
        self._tmp.unlink(missing_ok=True)


@dataclass
class ShardWriter:
    """Write samples into ``OUT/{prefix}-000000.tar, ...``, rolling over by sample count or byte size.

    Args:
        out_dir: directory the shards and ``shards.json`` go to (created if missing).
        shard_size: maximum samples per shard.
        max_shard_bytes: maximum payload bytes per shard (0 = no limit); a shard always holds >= 1 sample.
        prefix: shard file name prefix.
        meta: extra fields stored in ``shards.json`` (e.g. the generator's seed and split).
    """

    out_dir: Path
    shard_size: int
    max_shard_bytes: int = 0
    prefix: str = "shard"
    meta: dict = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list, init=False)
    _tar: tarfile.TarFile | None = field(default=None, init=False)
    _tmp_path: Path | None = field(default=None, init=False)
    _count: int = field(default=0, init=False)
    _bytes: int = field(default=0, init=False)
    _keys: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        if self.shard_size <= 0:
            raise ValueError(f"shard_size must be > 0, got {self.shard_size}")
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample. Keys must be unique and contain no '.' (webdataset splits on the first dot)."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        size = sum(len(b) for b in members.values())
        full = self._count >= self.shard_size
        too_big = self.max_shard_bytes > 0 and self._count > 0 and self._bytes + size > self.max_shard_bytes
        if self._tar is None or full or too_big:
            self._roll()
        assert self._tar is not None
        add_members(self._tar, key, members)
        self._keys.add(key)
        self._count += 1
        self._bytes += size

    def _roll(self) -> None:
        self._finish_current()
        index = len(self.shards)
        name = f"{self.prefix}-{index:06d}.tar"
        self._tmp_path = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish_current(self) -> None:
        if self._tar is None or self._tmp_path is None:
            return
        self._tar.close()
        final = self._tmp_path.with_suffix("")  # drop ".tmp"
        self._tmp_path.replace(final)
        self.shards.append(ShardInfo(final.name, self._count, final.stat().st_size))
        self._tar = None
        self._tmp_path = None

    def close(self) -> dict:
        """Finish the last shard and write ``shards.json``; returns the index it wrote."""
        self._finish_current()
        index = {
            "shards": [vars(s) for s in self.shards],
            "num_shards": len(self.shards),
            "num_samples": sum(s.num_samples for s in self.shards),
            **self.meta,
        }
        tmp = self.out_dir / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.out_dir / INDEX_NAME)
        return index

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # failed mid-shard: drop the partial temp file, keep finished shards
            self._tar.close()
            if self._tmp_path is not None:
                self._tmp_path.unlink(missing_ok=True)
