"""The data layer's public API: ``build_train_loader`` and ``build_eval_loader``.

Training loader (one per rank; infinite, stateful, exactly resumable). Each DataLoader worker runs one stream
(see sources.py for who reads what, stream.py for the stream and its state). A worker attaches a JSON snapshot
of its stream state (position, shuffle-buffer references, draw counter, cumulative skip counts) to every batch it
yields, under STATE_KEY; the loader pops it before handing the batch out and remembers the latest snapshot per
worker plus which worker comes next. torch's DataLoader hands out an IterableDataset's batches round-robin over
workers (worker n % W gives batch n), so that is the state of the batches CONSUMED, however far the workers
have prefetched. On resume worker w of the new DataLoader plays logical stream (w + next) % W, restores that
snapshot and continues; the next batches are bit-identical to an uninterrupted run's.

Buckets (data.buckets.enabled): training batches hold one aspect-ratio bucket each (images (B, 3, H, W) of that
bucket's shape plus orig_size / crop_top_left / target_size); each worker stream keeps its own partly filled
buckets, and their waiting samples are part of its snapshot, so resume stays exact. Evaluation stays square.
Arrays precomputed per bucket (spec.per_bucket, ``shards precompute --buckets-config``) must come from the same
bucket set with centre crops (checked at start); a sample's bucket is then the one its crop record names, and the
image is either not decoded at all (spec.decode_image False) or must have that same crop (stream.SampleDecoder).

Precomputed arrays (spec.precomputed): the builders validate, before any worker starts, that the precomputed
shards of data.precomputed_urls / data.eval_precomputed_urls are aligned with the source shards (aligned.py);
the workers then read each source shard zipped with its precomputed shard(s).

Errors: a DataError inside a worker travels as an error record with the batches and is raised here with its
own message; any other worker exception is re-raised by the DataLoader; a worker that stops producing fails after
data.worker_timeout_s. Nothing waits forever.
"""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import DataConfig
from pipeline.data.aligned import AlignedReader, align_precomputed
from pipeline.data.eval_stream import EvalShare, eval_batches
from pipeline.data.skips import SkipCounter, check_fraction, merge_counts
from pipeline.data.sources import ShardPlan, expand_shard_specs
from pipeline.data.spec import SampleSpec
from pipeline.data.buckets import BucketBatcher, auto_limits, resolve_shapes
from pipeline.data.stream import (SampleDecoder, SampleStream, ShardReader, next_batch, next_bucket_batch,
                                  restore_buckets, stream_samples)
from pipeline.data.tar_reader import iter_shard
from pipeline.data.transforms import RESERVED_KEYS, ImageOptions, auto_min_image_size
from pipeline.errors import ConfigError, DataError

logger = logging.getLogger(__name__)
STATE_KEY = "__data_stream__"
STATE_VERSION = 1


@dataclass(frozen=True)
class _Setup:
    """Everything a worker needs (small and picklable: it is copied into every worker)."""

    data: DataConfig
    spec: SampleSpec
    batch_size: int
    rank: int
    streams: int  # streams (workers) per rank, >= 1
    plan: ShardPlan | None = None
    aligned: AlignedReader | None = None  # zips in precomputed arrays when the spec requests some

    @property
    def read(self) -> ShardReader:
        return self.aligned if self.aligned is not None else iter_shard

    @property
    def buckets(self) -> tuple[tuple[int, int], ...]:
        """The training bucket shapes, or () for square images."""
        if not (self.data.buckets.enabled and self.spec.image_size):
            return ()
        return resolve_shapes(self.data.buckets, self.spec.image_size)

    def decoder(self, stream: int, random_crop: bool, seed: int, bucketed: bool = False) -> SampleDecoder:
        d = self.data
        arrays = self.aligned.arrays if self.aligned is not None else None
        buckets = self.buckets if bucketed else ()
        min_size, max_ratio = image_limits(d, self.spec.image_size, buckets)
        return SampleDecoder(self.spec, d.caption_key, random_crop, min_size, max_ratio, seed, stream, arrays, buckets)

    def skip_counter(self) -> SkipCounter:
        return SkipCounter(self.data.max_skip_fraction, self.data.skip_check_min_samples)


def image_limits(data: DataConfig, size: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, float]:
    """(min_image_size, max_aspect_ratio) the loader applies to images of output size `size` (and `buckets`)."""
    if buckets:
        return auto_limits(buckets, data.min_image_size, data.max_aspect_ratio)
    return auto_min_image_size(data.min_image_size, size), data.max_aspect_ratio


def bucket_options(data: DataConfig) -> ImageOptions:
    """How the training loader places and crops each image with data.buckets and data.crop center, at
    data.resolution: what `shards precompute --buckets-config` encodes, so cached and live latents agree."""
    if not data.buckets.enabled:
        raise ConfigError("--buckets-config: the config's data.buckets.enabled is false; precompute square latents "
                          "without --buckets-config, or enable data.buckets")
    buckets = resolve_shapes(data.buckets, data.resolution)
    return ImageOptions(data.resolution, False, *image_limits(data, data.resolution, buckets), buckets)


def _check_per_bucket(data: DataConfig, spec: SampleSpec, aligned: AlignedReader | None,
                      buckets: tuple[tuple[int, int], ...], key: str) -> None:
    """Arrays made from the cropped image must have been made from the crop this loader takes (spec.per_bucket)."""
    for name, info in (aligned.arrays if aligned is not None else {}).items():
        if info.buckets and not buckets:
            raise DataError(f"precomputed {name!r} in {key} was computed per aspect-ratio bucket, but this loader "
                            f"makes squares (data.buckets off, or evaluation); precompute it without "
                            f"--buckets-config")
        if name not in spec.per_bucket or not buckets:
            continue
        if not info.buckets:
            raise DataError(f"precomputed {name!r} in {key} are centre squares but data.buckets is on; precompute "
                            f"them per bucket: shards precompute ... --buckets-config RUN.yaml")
        if set(info.buckets) != set(buckets):
            raise DataError(f"precomputed {name!r} in {key} were made for buckets "
                            f"{', '.join(f'{h}x{w}' for h, w in info.buckets)}, this run has "
                            f"{', '.join(f'{h}x{w}' for h, w in buckets)}; re-run the precompute with "
                            f"--buckets-config RUN.yaml of this run")
        if data.crop != "center":
            raise ConfigError(f"data.crop {data.crop}: precomputed per-bucket {name!r} holds one (centre) crop per "
                              f"image; set data.crop: center")


def _check_args(spec: SampleSpec, batch_size: int, rank: int, world_size: int) -> None:
    if batch_size <= 0:
        raise DataError(f"batch_size must be > 0, got {batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not valid for world_size {world_size}")
    if spec.image_size < 0:
        raise DataError(f"SampleSpec.image_size must be >= 0, got {spec.image_size}")
    clash = set(spec.precomputed) & set(RESERVED_KEYS)
    if clash or len(set(spec.precomputed)) != len(spec.precomputed):
        raise DataError(f"SampleSpec.precomputed {spec.precomputed} must name distinct arrays other than "
                        f"{', '.join(RESERVED_KEYS)}")


class _SkipLog:
    """Logs each skip reason once per loader, with the first example, however many workers report it."""

    def __init__(self) -> None:
        self.logged: set[str] = set()

    def update(self, counts: dict[str, int], notes: dict[str, str]) -> None:
        for reason in sorted(set(counts) - self.logged):
            self.logged.add(reason)
            logger.warning("data: skipping %s (first: %s); further ones are only counted (skip_counts())",
                           reason, notes.get(reason, "?"))


def _iterate(dataset: IterableDataset, data: DataConfig) -> Iterator[dict]:
    """Batches from `dataset`, in the main process (num_workers 0) or round-robin from worker processes."""
    if data.num_workers == 0:
        yield from dataset
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=data.num_workers, timeout=data.worker_timeout_s,
                        prefetch_factor=2, persistent_workers=False)
    iterator = iter(loader)
    try:
        yield from iterator
    except RuntimeError as exc:
        if "timed out" not in str(exc):
            raise
        raise DataError(f"no batch from a data worker within data.worker_timeout_s={data.worker_timeout_s} s "
                        f"(a stalled pipe: command or storage?)") from exc
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:  # stop the workers now, not whenever the iterator is garbage-collected
            shutdown()


class _TrainStreams(IterableDataset):
    """Yields one worker's infinite batches; `rotation` maps DataLoader worker ids to logical streams."""

    def __init__(self, setup: _Setup, snapshots: list[dict | None], rotation: int) -> None:
        self.setup, self.snapshots, self.rotation = setup, snapshots, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        logical = ((info.id if info is not None else 0) + self.rotation) % self.setup.streams
        s = self.setup
        assert s.plan is not None
        stream_id = s.rank * s.streams + logical
        skips = s.skip_counter()
        try:
            snapshot = self.snapshots[logical]
            stream = SampleStream(s.plan, stream_id, s.data.shuffle_buffer, skips, snapshot, s.read)
            decode = s.decoder(stream_id, s.data.crop == "random", s.plan.seed, bucketed=True)
            batcher = BucketBatcher(len(s.buckets), s.batch_size) if s.buckets else None
            if batcher is not None and snapshot is not None:
                restore_buckets(batcher, snapshot["buckets"], stream, decode)
            samples = stream_samples(stream)
            while True:
                if batcher is None:
                    batch = next_batch(samples, decode, s.spec, s.batch_size, skips, shared=info is not None)
                    assert batch is not None  # the stream is infinite
                else:
                    batch = next_bucket_batch(samples, decode, s.spec, batcher, skips, shared=info is not None)
                state = stream.snapshot()
                if batcher is not None:
                    state["buckets"] = batcher.snapshot()
                batch[STATE_KEY] = json.dumps({"worker": logical, "state": state})
                yield batch
        except DataError as exc:
            yield {STATE_KEY: json.dumps({"worker": logical, "error": str(exc)})}


class TrainLoader:
    """Infinite, exactly resumable batches for one rank (implements spec.BatchLoader).

    Iterating again (or after load_state_dict) continues from the last batch handed out.
    """

    def __init__(self, setup: _Setup, seed: int, world_size: int) -> None:
        self._setup, self._seed, self._world_size = setup, seed, world_size
        self._snapshots: list[dict | None] = [None] * setup.streams
        self._next_worker = 0
        self._batches = 0
        self._active: Iterator[dict] | None = None
        self._log = _SkipLog()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._active = self._run()
        return self._active

    def close(self) -> None:
        """Stop the worker processes of the running iteration (if any); the position is kept."""
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
            self._active = None

    def _run(self) -> Iterator[dict]:
        dataset = _TrainStreams(self._setup, copy.deepcopy(self._snapshots), self._next_worker)
        source = _iterate(dataset, self._setup.data)
        try:
            for batch in source:
                self._consume(batch)
                yield batch
        finally:
            source.close()  # stop the workers now, also when an error propagates (its traceback holds us)
        raise DataError("the training data stream ended, which should never happen; please report this")

    def _consume(self, batch: dict) -> None:
        meta = json.loads(batch.pop(STATE_KEY))
        if "error" in meta:
            raise DataError(meta["error"])
        self._snapshots[meta["worker"]] = meta["state"]
        self._next_worker = (meta["worker"] + 1) % self._setup.streams
        self._batches += 1
        counts, notes, seen = merge_counts(s["skips"] for s in self._snapshots if s)
        self._log.update(counts, notes)
        skipped = sum(n for r, n in counts.items() if not r.endswith("_shard"))
        data = self._setup.data
        check_fraction(skipped, seen, data.max_skip_fraction, data.skip_check_min_samples, counts)

    def skip_counts(self) -> dict[str, int]:
        """Samples and shards skipped by reason, summed over workers, as of the last batch handed out."""
        return merge_counts(s["skips"] for s in self._snapshots if s)[0]

    def state_dict(self) -> dict[str, Any]:
        """Plain data (weights_only-safe): the position of every worker stream after the last batch handed out."""
        s = self._setup
        assert s.plan is not None
        return {"version": STATE_VERSION, "rank": s.rank, "world_size": self._world_size,
                "num_workers": s.data.num_workers, "streams": s.streams, "seed": self._seed,
                "plan": s.plan.fingerprint(), "num_shards": len(s.plan.urls), "batches": self._batches,
                "buckets": [list(shape) for shape in s.buckets],
                "next_worker": self._next_worker, "workers": copy.deepcopy(self._snapshots)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch recorded in `state`; DataError if that cannot be done exactly."""
        s = self._setup
        assert s.plan is not None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state has version {state.get('version') if isinstance(state, dict) else '?'}"
                            f", this code reads version {STATE_VERSION}")
        wanted = {"world_size": self._world_size, "rank": s.rank, "streams": s.streams, "seed": self._seed}
        for key, value in wanted.items():
            if state.get(key) != value:
                raise DataError(f"cannot resume the data stream exactly: it was saved with {key}={state.get(key)} "
                                f"(num_workers={state.get('num_workers')}), this run has {key}={value} "
                                f"(num_workers={s.data.num_workers}); resume with the same world size, "
                                f"data.num_workers and train.seed")
        if [tuple(b) for b in state.get("buckets", [])] != list(s.buckets):
            raise DataError(f"cannot resume the data stream exactly: it was saved with buckets "
                            f"{state.get('buckets', [])}, this run has {[list(b) for b in s.buckets]}; resume with "
                            f"the same data.buckets and resolution")
        if state.get("plan") != s.plan.fingerprint():
            raise DataError(f"cannot resume the data stream exactly: the shard list changed since the checkpoint "
                            f"({state.get('num_shards')} shards then, {len(s.plan.urls)} now, or other names or "
                            f"data.shuffle_shards/resampled); restore data.urls or start a new run")
        self.close()
        self._snapshots = copy.deepcopy(list(state["workers"]))
        self._next_worker = int(state["next_worker"])
        self._batches = int(state["batches"])


def build_train_loader(data: DataConfig, spec: SampleSpec, *, batch_size: int, seed: int, rank: int,
                       world_size: int) -> TrainLoader:
    """The infinite training stream of `rank` (of `world_size`), with state_dict/load_state_dict/skip_counts.

    Batches: dicts of spec.py (image uint8 (B, 3, S, S), caption, key, tokenizer outputs, precomputed arrays).
    Shards are split over world_size x max(1, data.num_workers) streams; shard order is shuffled per epoch from
    (seed, epoch).

    Raises:
        DataError: data.urls is empty or a spec in it matches no file; invalid arguments; precomputed arrays
            requested but data.precomputed_urls missing or not aligned with data.urls (same error on every rank).
        ConfigError: data.buckets allows no shape for spec.image_size, or the size is not a multiple of its step.
    """
    _check_args(spec, batch_size, rank, world_size)
    urls = expand_shard_specs(data.urls, "data.urls")
    aligned = align_precomputed(urls, data.precomputed_urls, spec.precomputed, "data.precomputed_urls", "data.urls")
    streams = max(1, data.num_workers)
    plan = ShardPlan(tuple(urls), world_size * streams, seed, data.shuffle_shards, data.resampled)
    setup = _Setup(data, spec, batch_size, rank, streams, plan, aligned)
    _check_per_bucket(data, spec, aligned, setup.buckets, "data.precomputed_urls")
    if setup.buckets:  # bad bucket settings fail here, once, not in every worker
        logger.info("data: %d aspect-ratio buckets (height x width): %s", len(setup.buckets),
                    ", ".join(f"{h}x{w}" for h, w in setup.buckets))
    return TrainLoader(setup, seed, world_size)


class _EvalWorkers(IterableDataset):
    def __init__(self, setup: _Setup, urls: list[str], world_size: int, max_samples: int) -> None:
        self.setup, self.urls, self.world_size, self.max_samples = setup, urls, world_size, max_samples

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        s = self.setup
        share = EvalShare(s.rank, self.world_size, worker, s.streams, s.batch_size, self.max_samples)
        skips = s.skip_counter()
        try:
            decode = s.decoder(worker, False, 0)
            for batch in eval_batches(self.urls, share, decode, s.spec, skips, info is not None, s.read):
                batch[STATE_KEY] = json.dumps({"worker": worker, "skips": skips.state()})
                yield batch
            yield {STATE_KEY: json.dumps({"worker": worker, "skips": skips.state()})}  # final counts only
        except DataError as exc:
            yield {STATE_KEY: json.dumps({"worker": worker, "error": str(exc)})}


class EvalLoader:
    """One deterministic pass over data.eval_urls per iteration (this rank's share, center crops)."""

    def __init__(self, setup: _Setup, urls: list[str], world_size: int, max_samples: int) -> None:
        self._dataset = _EvalWorkers(setup, urls, world_size, max_samples)
        self._data = setup.data
        self._skips: dict[int, dict] = {}
        self._log = _SkipLog()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._skips = {}
        source = _iterate(self._dataset, self._data)
        try:
            for batch in source:
                meta = json.loads(batch.pop(STATE_KEY))
                if "error" in meta:
                    raise DataError(meta["error"])
                self._skips[meta["worker"]] = meta["skips"]
                counts, notes, _ = merge_counts(self._skips.values())
                self._log.update(counts, notes)
                if batch:
                    yield batch
        finally:
            source.close()

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples/shards by reason in the current (or last) pass."""
        return merge_counts(self._skips.values())[0]


def build_eval_loader(data: DataConfig, spec: SampleSpec, *, batch_size: int, max_samples: int, rank: int,
                      world_size: int) -> Iterable[dict]:
    """A re-iterable, deterministic single pass over data.eval_urls: at most `max_samples` over all ranks,
    this rank's share, center crops, no shuffling; the last batch may be smaller (see eval_stream.py).

    Raises:
        DataError: data.eval_urls is empty or a spec in it matches no file; invalid arguments; precomputed arrays
            requested but data.eval_precomputed_urls missing or not aligned with data.eval_urls.
    """
    _check_args(spec, batch_size, rank, world_size)
    if max_samples <= 0:
        raise DataError(f"max_samples must be > 0, got {max_samples}")
    urls = expand_shard_specs(data.eval_urls, "data.eval_urls")
    aligned = align_precomputed(urls, data.eval_precomputed_urls, spec.precomputed, "data.eval_precomputed_urls",
                                "data.eval_urls")
    setup = _Setup(data, spec, batch_size, rank, max(1, data.num_workers), aligned=aligned)
    _check_per_bucket(data, spec, aligned, (), "data.eval_precomputed_urls")  # evaluation stays square
    return EvalLoader(setup, urls, world_size, max_samples)
