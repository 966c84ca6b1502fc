"""Reading source shards zipped with their precomputed-conditioning shards (format: precomputed_index.py).

Start-up validation (:func:`align_precomputed`, called by both loader builders before any worker starts). Every
rank runs the same deterministic checks on the same files - names, shards.json contents, file sizes; no
collective, so a mismatch raises the same DataError in every rank and none waits for the others. Per precompute
directory named by data.precomputed_urls (one directory per precompute run; several runs may provide different
arrays):

    - the directory's shard names equal the source shard names (data.urls) exactly, each source name unique;
    - its shards.json (or, before ``--finalize``, its complete set of part files) lists each source shard with
      the byte size it was computed from, equal to the source file's size now (local sources), and the sample
      count equal to the source's own shards.json count (when it has one) and to the precomputed shard's count;
    - each precomputed shard file has the byte size its shards.json records (not rewritten or truncated);
    - every array the stage requests is provided by exactly one directory; an array computed per aspect-ratio
      bucket brings its directory's crop record (precomputed_index.CROP_ARRAY) along, which decides the sample's
      bucket in the training loader.

Streaming (:class:`AlignedReader`): a source shard and its precomputed shard(s) are read in lockstep with the
same start offset and sample-index filter, so exact resume and the index split of small datasets work as for
plain shards. A different key or index at the same position, or a source sample whose content digest differs
from the one recorded at precompute time, is a DataError (misalignment or stale arrays must stop the run, never be
skipped); a precomputed shard that breaks off mid-way is counted like a broken source shard.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.precomputed_index import (CROP_ARRAY, DIGEST_MEMBER, SKIP_MEMBER, array_member, load_index,
                                             shard_name, source_counts, source_digest)
from pipeline.data.sources import expand_shard_specs, local_path
from pipeline.data.tar_reader import Report, iter_shard
from pipeline.errors import DataError

PRE_PREFIX = "pre/"  # prefix of precomputed members in a RawSample ('/' never occurs in a tar member extension)
SKIP_KEY = PRE_PREFIX + SKIP_MEMBER
Sample = tuple[int, str, dict[str, bytes]]


@dataclass(frozen=True)
class ArrayInfo:
    """Per-sample dtype (numpy name) and shape of one precomputed array.

    shape: None for a side that follows the sample's bucket; buckets: the (height, width) image shapes of a
    bucketed precompute (``shards precompute --buckets-config``), () for the square centre crop.
    """

    dtype: str
    shape: tuple[int | None, ...]
    buckets: tuple[tuple[int, int], ...] = ()

    def fits(self, dtype: str, shape: tuple[int, ...]) -> bool:
        """Whether an array of `dtype` and `shape` is one this index describes."""
        return dtype == self.dtype and len(shape) == len(self.shape) and \
            all(want is None or want == got for want, got in zip(self.shape, shape))


def pre_key(name: str) -> str:
    """Where array `name`'s bytes sit in a zipped sample's members."""
    return PRE_PREFIX + array_member(name)


def skip_note(members: dict[str, bytes]) -> str:
    """Why the precompute wrote no arrays for a sample (from its KEY.skip member), for skip logs."""
    raw = members.get(SKIP_KEY)
    if raw is None:
        return "no such array in the precomputed sample"
    try:
        note = json.loads(raw.decode("utf-8"))
        return f"precompute skipped it: {note.get('reason')}: {note.get('detail')}"
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return "precompute skipped it"


def skip_reason(members: dict[str, bytes]) -> tuple[str, str] | None:
    """(reason, detail) the precompute recorded for a sample it could not fully encode (KEY.skip), else None."""
    raw = members.get(SKIP_KEY)
    if raw is None:
        return None
    try:
        note = json.loads(raw.decode("utf-8"))
        return str(note.get("reason")), str(note.get("detail"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return "precomputed_missing", "precompute skipped it"


@dataclass(frozen=True)
class AlignedReader:
    """``iter_shard`` for source shards zipped with their precomputed shards (plain data: pickles into workers).

    pairs: source url -> its precomputed shard urls, one per used precompute directory.
    arrays: requested array name -> dtype and shape.
    members: per used directory, the requested arrays it provides.
    """

    pairs: dict[str, tuple[str, ...]]
    arrays: dict[str, ArrayInfo]
    members: tuple[tuple[str, ...], ...]

    def __call__(self, url: str, report: Report, start: int = 0,
                 keep: Callable[[int], bool] | None = None) -> Iterator[Sample]:
        """Samples of source shard `url` (as iter_shard) with each requested array's bytes under pre_key(name)."""
        pres = self.pairs[url]
        # The source decides which indices are kept; precomputed shards replay those decisions, so a stateful
        # `keep` (the eval pass counts samples with it) is called once per source header only.
        decided: list[dict[int, bool]] = [{} for _ in pres]

        def source_keep(index: int) -> bool:
            wanted = keep(index)  # type: ignore[misc]
            for d in decided:
                d[index] = wanted
            return wanted

        broken = [False] * len(pres)
        source_broken = [False]

        def source_report(reason: str, detail: str) -> None:
            source_broken[0] = True
            report(reason, detail)

        def opener(n: int) -> Iterator[Sample]:
            def pre_report(reason: str, detail: str) -> None:
                broken[n] = True
                report(reason, detail)

            def pre_keep(index: int) -> bool:
                return decided[n].pop(index, False)

            return iter_shard(pres[n], pre_report, start, None if keep is None else pre_keep)

        source = iter_shard(url, source_report, start, None if keep is None else source_keep)
        readers = [opener(n) for n in range(len(pres))]
        try:
            for index, key, members in source:
                digest = source_digest(members)  # before precomputed members are attached to `members`
                for n, reader in enumerate(readers):
                    got = next(reader, None)
                    if got is None:
                        if broken[n]:
                            return  # counted (truncated/missing shard): the rest of this unit has no arrays
                        raise DataError(f"precomputed shard {pres[n]} ends before sample {index} ({key!r}) of "
                                        f"source shard {url}: they are misaligned; re-run the precompute")
                    self._attach(n, members, got, (index, key, digest), url, pres[n])
                yield index, key, members
            if keep is None and not source_broken[0]:
                self._check_ended(url, pres, readers, broken)
        finally:  # stop reading (and kill pipe commands) now, also on errors and early returns
            for reader in (source, *readers):
                reader.close()  # type: ignore[attr-defined]

    def _attach(self, n: int, members: dict[str, bytes], got: Sample, want: tuple[int, str, bytes], url: str,
                pre: str) -> None:
        index, key, extra = got
        if (index, key) != want[:2]:
            raise DataError(f"precomputed shard {pre} is misaligned with source shard {url}: sample {want[0]} is "
                            f"{want[1]!r} in the source but {key!r} (sample {index}) in the precomputed shard; "
                            f"re-run the precompute for this shard")
        if DIGEST_MEMBER in extra and extra[DIGEST_MEMBER] != want[2]:
            raise DataError(f"sample {key!r} of source shard {url} changed since the precompute (its content "
                            f"digest differs from the one in {pre}): the precomputed arrays are stale; re-run the "
                            f"precompute")
        for name in self.members[n]:
            data = extra.get(array_member(name))
            if data is not None:
                members[pre_key(name)] = data
        if SKIP_MEMBER in extra:
            members[SKIP_KEY] = extra[SKIP_MEMBER]

    @staticmethod
    def _check_ended(url: str, pres: tuple[str, ...], readers: list[Iterator[Sample]], broken: list[bool]) -> None:
        for n, reader in enumerate(readers):
            extra = next(reader, None)
            if extra is not None and not broken[n]:
                raise DataError(f"precomputed shard {pres[n]} has more samples than source shard {url} (next: "
                                f"{extra[1]!r}): they are misaligned; re-run the precompute")


def _by_name(urls: list[str], key: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for url in urls:
        name = shard_name(url)
        if name in names:
            raise DataError(f"{key}: two shards are named {name!r} ({names[name]} and {url}); precomputed shards "
                            f"are matched to source shards by file name, so names must be unique")
        names[name] = url
    return names


def _group_by_directory(urls: list[str], key: str) -> dict[Path, dict[str, str]]:
    groups: dict[Path, list[str]] = {}
    for url in urls:
        path = local_path(url)
        if path is None:
            raise DataError(f"{key}: {url!r} is not a local file; precomputed shards are validated against their "
                            f"shards.json before reading, so they must be local (a directory, pattern or list)")
        groups.setdefault(Path(path).parent, []).append(url)
    return {directory: _by_name(group, key) for directory, group in groups.items()}


def _check_counts(name: str, url: str, recorded: dict, out: dict, counts: dict[str, int], where: str) -> None:
    if name in counts and counts[name] != recorded["num_samples"]:
        raise DataError(f"source shard {url} has {counts[name]} samples (its shards.json) but {where} was computed "
                        f"from {recorded['num_samples']}: the source changed; re-run the precompute")
    if out["num_samples"] != recorded["num_samples"]:
        raise DataError(f"{where}: precomputed shard {name} records {out['num_samples']} samples, its source "
                        f"{recorded['num_samples']}: the index is inconsistent; re-run the precompute")


def _check_sizes(name: str, url: str, pre: str, recorded: dict, out: dict, where: str) -> None:
    path = local_path(url)
    if path is not None and Path(path).is_file():  # a missing source shard is counted when it is read
        size = Path(path).stat().st_size
        if size != recorded["num_bytes"]:
            raise DataError(f"source shard {url} changed since the precompute ({size} bytes now, "
                            f"{recorded['num_bytes']} when {where} was computed); re-run the precompute")
    pre_path = Path(local_path(pre) or pre)
    if not pre_path.is_file():
        raise DataError(f"precomputed shard {pre} for source shard {url} is missing; re-run the precompute")
    if pre_path.stat().st_size != out["num_bytes"]:
        raise DataError(f"precomputed shard {pre} has {pre_path.stat().st_size} bytes but its shards.json records "
                        f"{out['num_bytes']}: it was rewritten or truncated; re-run the precompute")


def _check_directory(directory: Path, index: dict, pres: dict[str, str], sources: dict[str, str],
                     counts: dict[str, int], key: str, source_key: str) -> None:
    where = f"the precompute in {directory}"
    only_source = [n for n in sources if n not in pres]
    only_pre = [n for n in pres if n not in sources]
    if only_source or only_pre:
        what = (f"source shard {sources[only_source[0]]} ({source_key}) has no precomputed shard in {directory}"
                if only_source else f"precomputed shard {pres[only_pre[0]]} has no source shard in {source_key}")
        raise DataError(f"{key} does not match {source_key}: {what} ({len(sources)} source shards, {len(pres)} "
                        f"precomputed here, {len(only_source)} + {len(only_pre)} unmatched); give {key} the same "
                        f"shard list as {source_key}")
    recorded = {s["name"]: s for s in index["source"]}
    outs = {e["url"]: e for e in index["shards"]}
    for name, url in sources.items():
        if name not in recorded or name not in outs:
            raise DataError(f"source shard {url} was not part of {where} (its shards.json lists "
                            f"{len(recorded)} source shards); re-run the precompute over {source_key}")
        _check_counts(name, url, recorded[name], outs[name], counts, where)
        _check_sizes(name, url, pres[name], recorded[name], outs[name], where)


def align_precomputed(urls: list[str], precomputed_urls: str | tuple[str, ...], wanted: tuple[str, ...],
                      key: str = "data.precomputed_urls", source_key: str = "data.urls") -> AlignedReader | None:
    """Validate that the precomputed shards fit the source shards `urls` and provide the arrays `wanted`.

    Returns None when nothing is wanted (plain shards are read); otherwise the reader that zips them.

    Raises:
        DataError: arrays wanted but `precomputed_urls` empty; any alignment rule of the module docstring broken.
    """
    if not wanted:
        return None
    specs = [precomputed_urls] if isinstance(precomputed_urls, str) else list(precomputed_urls)
    if not any(str(s).strip() for s in specs):
        raise DataError(f"the stage reads precomputed arrays {list(wanted)} but {key} is empty: compute them with "
                        f"`python -m pipeline shards precompute` and set {key} to its --out directory")
    groups = _group_by_directory(expand_shard_specs(precomputed_urls, key), key)
    sources = _by_name(urls, source_key)
    counts = source_counts(urls)
    provider: dict[str, Path] = {}
    infos: dict[str, ArrayInfo] = {}
    available: list[str] = []
    for directory, pres in groups.items():
        index = load_index(directory)
        _check_directory(directory, index, pres, sources, counts, key, source_key)
        for name, meta in index["arrays"].items():
            available.append(name)
            if name in wanted and name in provider:
                raise DataError(f"{key}: array {name!r} is provided by both {provider[name]} and {directory}; "
                                f"name only one of them")
            if name in wanted:
                provider[name], infos[name] = directory, _info(meta)
        if any(infos[n].buckets for n, d in provider.items() if d == directory):
            if CROP_ARRAY not in index["arrays"]:
                raise DataError(f"the precompute in {directory} has bucketed arrays but no {CROP_ARRAY!r} records: "
                                f"the index is inconsistent; re-run the precompute")
            provider[CROP_ARRAY], infos[CROP_ARRAY] = directory, _info(index["arrays"][CROP_ARRAY])
    missing = [name for name in wanted if name not in provider]
    if missing:
        raise DataError(f"the stage reads precomputed arrays {missing} that no directory in {key} provides "
                        f"(available: {sorted(set(available)) or 'none'}); precompute them with the right --encoder")
    used = [d for d in groups if d in provider.values()]
    pairs = {url: tuple(groups[d][name] for d in used) for name, url in sources.items()}
    names = (*wanted, CROP_ARRAY) if CROP_ARRAY in provider and CROP_ARRAY not in wanted else wanted
    members = tuple(tuple(n for n in names if provider[n] == d) for d in used)
    return AlignedReader(pairs, {n: infos[n] for n in names}, members)


def _info(meta: dict) -> ArrayInfo:
    return ArrayInfo(str(meta["dtype"]), tuple(None if s is None else int(s) for s in meta["shape"]),
                     tuple((int(h), int(w)) for h, w in meta.get("buckets", ())))
