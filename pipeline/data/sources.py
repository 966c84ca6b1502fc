"""Where shards come from and which stream reads which shard when.

A *shard spec* (``data.urls`` / ``data.eval_urls``) is a directory (every ``*.tar`` in it, sorted), a brace
pattern (``dir/shard-{000000..000009}.tar``), ``pipe:CMD`` (the command's stdout is a tar), any other URL
webdataset's ``gopen`` understands, or a list of these. Local specs are checked at construction: a spec that
matches no file at all raises :class:`DataError` naming it (a typo must not become an empty run). Individual
files of a brace pattern that are missing at read time are skipped and counted (``missing_shard``).

Reading plan (training). Each rank runs ``max(1, num_workers)`` streams; stream ``g = rank * W + worker`` of
``G = world_size * W`` streams. Shards are cut into *units*: normally one unit per shard, but when there are fewer
shards than streams every shard is split into ``parts = ceil(G / num_shards)`` units by sample index
(sample ``i`` of a shard belongs to part ``i % parts``), so every stream always has work. Conceptually the units
of epoch 0, 1, 2, ... (each epoch a fresh seeded permutation) form one infinite sequence; stream ``g`` reads
positions ``g, g + G, g + 2G, ...`` of it. So within an epoch the streams read disjoint units, uneven division
only means a stream's next unit comes from the next epoch, and no stream ever runs dry (collectives never hang
for lack of data). In resampled mode stream ``g``'s ``k``-th unit is drawn uniformly with replacement.
Everything is a pure function of (seed, stream, k): nothing has to be saved but ``k`` to resume.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from pipeline.errors import DataError

_MASK = (1 << 64) - 1
# Salts keep the independent random decisions (shard order, resampling, shuffle buffer, crops) uncorrelated.
SALT_PERM, SALT_RESAMPLE, SALT_SHUFFLE, SALT_CROP = 1, 2, 3, 4


def mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 chained): counter-based randomness that needs no saved RNG state."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = ((h ^ (v & _MASK)) + 0x9E3779B97F4A7C15) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h


def local_path(url: str) -> str | None:
    """The filesystem path of a local url, or None for pipes and remote urls (which cannot be checked early)."""
    if url.startswith("pipe:"):
        return None
    if url.startswith("file:"):
        return url[7:] if url.startswith("file://") else url[5:]
    return None if "://" in url else url


def _expand_one(spec: str, key: str) -> list[str]:
    spec = spec.strip()
    local = local_path(spec)
    if local is not None and Path(local).is_dir():
        tars = sorted(str(p) for p in Path(local).iterdir() if p.name.endswith(".tar") and p.is_file())
        if not tars:
            raise DataError(f"{key}: directory {spec!r} contains no *.tar shards")
        return tars
    urls = expand_urls(spec)
    if local is not None and not any(Path(local_path(u) or u).is_file() for u in urls):
        what = f"{len(urls)} expanded names, e.g. {urls[0]!r}" if len(urls) > 1 else "no such file"
        raise DataError(f"{key}: shard spec {spec!r} matches no file ({what}); check the path")
    return urls


def expand_shard_specs(urls: str | os.PathLike | tuple[str, ...] | list[str], key: str = "data.urls") -> list[str]:
    """Expand a shard spec (or a list of them) into shard urls, in the given order; `key` names it in errors.

    Raises:
        DataError: the spec is empty, a directory holds no ``*.tar``, or a local spec matches no file.
    """
    specs = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    specs = [str(s) for s in specs if str(s).strip()]
    if not specs:
        raise DataError(f"{key} is empty: set it to a shard directory, a brace pattern, a list or 'pipe:CMD'")
    out: list[str] = []
    for spec in specs:
        out.extend(_expand_one(spec, key))
    return out


@functools.lru_cache(maxsize=16)
def _permutation(num_units: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_units))
    random.Random(mix(seed, SALT_PERM, epoch)).shuffle(order)
    return tuple(order)


@dataclass(frozen=True)
class Unit:
    """One read of (part of) a shard: samples whose in-shard index ``i % parts == part`` are this unit's."""

    url: str
    part: int
    parts: int
    epoch: int
    index: int  # unit number in 0 .. num_units - 1


@dataclass(frozen=True)
class ShardPlan:
    """Which unit stream ``g`` reads as its ``k``-th read (see the module docstring)."""

    urls: tuple[str, ...]
    num_streams: int
    seed: int
    shuffle: bool = True
    resampled: bool = False

    @property
    def parts(self) -> int:
        """Sample-index parts per shard: 1, or enough that there are at least as many units as streams."""
        return max(1, math.ceil(self.num_streams / len(self.urls)))

    @property
    def num_units(self) -> int:
        return len(self.urls) * self.parts

    def unit(self, stream: int, k: int) -> Unit:
        """The `k`-th unit read by `stream` (0 <= stream < num_streams, k >= 0)."""
        n = self.num_units
        position = stream + k * self.num_streams
        epoch, slot = divmod(position, n)
        if self.resampled:
            index = mix(self.seed, SALT_RESAMPLE, stream, k) % n
        else:
            index = _permutation(n, self.seed, epoch)[slot] if self.shuffle else slot
        return Unit(self.urls[index // self.parts], index % self.parts, self.parts, epoch, index)

    def fingerprint(self) -> str:
        """Identifies the reading order; file names only, so a moved dataset directory still resumes."""
        names = [os.path.basename(u.rstrip("/")) for u in self.urls]
        blob = json.dumps([names, self.num_streams, self.shuffle, self.resampled])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]
