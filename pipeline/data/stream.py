"""One worker's sample stream: unit reads in plan order, a shuffle buffer, decoding, and batches.

Exact resume. A stream's whole state at a batch boundary is small and plain:

    k         how many unit reads it started (its current unit is ``plan.unit(stream, k)``)
    offset    in-shard index just after the last sample taken from the current unit
    buffer    the shuffle buffer as [[k, index], ...] references, in buffer order
    draws     how many samples were drawn from the buffer (the draw RNG is a hash of this counter)
    skips     the stream's SkipCounter state
    buckets   with data.buckets: per bucket the [k, index, key] of the samples waiting in it (buckets.py)

Every random decision is a hash of (seed, stream, counter) - shard order per epoch, resampling, buffer draws,
crop offsets - so no RNG object has to be saved. Restoring re-reads the buffered (and bucket-waiting) samples
from their shards by (k, index) and seeks the current unit to `offset`; the following batches are then
bit-identical to an uninterrupted run's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.data.aligned import ArrayInfo, pre_key, skip_note, skip_reason
from pipeline.data.buckets import BucketBatcher, Waiting
from pipeline.data.precomputed_index import CROP_ARRAY, read_npy
from pipeline.data.skips import SkipCounter
from pipeline.data.sources import SALT_CROP, SALT_SHUFFLE, ShardPlan, mix
from pipeline.data.spec import SampleSpec
from pipeline.data.tar_reader import iter_shard
from pipeline.data.transforms import (Crop, ImageOptions, SkipSample, collate, decode_mask, decode_with_crop,
                                      image_bytes, read_caption)
from pipeline.errors import DataError

# How a stream reads one shard: iter_shard, or an aligned.AlignedReader that zips in precomputed arrays.
ShardReader = Callable[..., Iterator[tuple[int, str, dict[str, bytes]]]]
Decoded = tuple[np.ndarray | None, str, dict[str, np.ndarray]]


@dataclass(slots=True)
class RawSample:
    """Undecoded sample: which unit read (`k`) and in-shard `index` it came from, its key and member bytes."""

    k: int
    index: int
    key: str
    members: dict[str, bytes]


def _ignore(reason: str, detail: str) -> None:
    """Report sink while rebuilding a buffer: those problems were already counted before the checkpoint."""


class SampleStream:
    """The infinite raw-sample stream of stream `stream` of `plan`, shuffled through a buffer.

    Args:
        plan: the reading plan shared by all streams.
        stream: this stream's number g (rank * workers + worker).
        buffer_size: shuffle buffer capacity in samples; <= 1 means no shuffling.
        skips: where shard-level problems are counted.
        state: a snapshot() to continue from, or None to start at the beginning.
        read: how a shard is read (iter_shard's signature).
    """

    def __init__(self, plan: ShardPlan, stream: int, buffer_size: int, skips: SkipCounter,
                 state: dict | None = None, read: ShardReader = iter_shard) -> None:
        self.plan, self.stream, self.skips, self.read = plan, stream, skips, read
        self.buffer_size = buffer_size if buffer_size > 1 else 0
        self.k, self.offset, self.draws = 0, 0, 0
        self.buffer: list[RawSample] = []
        self._reader: Iterator[RawSample] | None = None
        self._unit_gave = False  # whether the current unit produced a sample (for the all-shards-fail check)
        self._empty_run = 0  # consecutive unit reads that produced nothing ...
        self._empty_units: set[int] = set()  # ... and the distinct units among them
        if state is not None:
            self._restore(state)

    def _read_unit(self, k: int, start: int, report, wanted: set[int] | None = None) -> Iterator[RawSample]:
        unit = self.plan.unit(self.stream, k)
        if wanted is not None:
            keep = wanted.__contains__
        elif unit.parts > 1:
            def keep(i: int) -> bool:
                return i % unit.parts == unit.part
        else:
            keep = None
        for index, key, members in self.read(unit.url, report, start, keep):
            yield RawSample(k, index, key, members)

    def _next_raw(self) -> RawSample:
        while True:
            if self._reader is None:
                self._reader = self._read_unit(self.k, self.offset, self.skips.add)
                self._unit_gave = self.offset > 0
            raw = next(self._reader, None)
            if raw is not None:
                self.offset = raw.index + 1
                self._unit_gave, self._empty_run = True, 0
                self._empty_units.clear()
                return raw
            if not self._unit_gave:
                self._count_empty_unit()
            self.k, self.offset, self._reader = self.k + 1, 0, None

    def _count_empty_unit(self) -> None:
        """Fail when every unit came up empty in a row, or (a stream may never reach some units, and in
        resampled mode a few bad shards in a row are normal) after far more empty reads than there are units."""
        n = self.plan.num_units
        self._empty_run += 1
        self._empty_units.add(self.plan.unit(self.stream, self.k).index)
        if len(self._empty_units) >= n or self._empty_run >= max(8 * n, 64):
            self._fail_no_data()

    def _fail_no_data(self) -> None:
        shard_problems = {r: n for r, n in self.skips.counts.items() if r.endswith("_shard")}
        first = next((note for r, note in self.skips.notes.items() if r in shard_problems), "")
        detail = f" ({', '.join(f'{r}={n}' for r, n in sorted(shard_problems.items()))}; first: {first})" \
            if shard_problems else ""
        raise DataError(f"data stream {self.stream} got no sample from {self._empty_run} consecutive shard reads "
                        f"({len(self._empty_units)} of {self.plan.num_units} distinct units, {len(self.plan.urls)} "
                        f"shards){detail}: every shard failed or is empty, or there are fewer samples than "
                        f"ranks x workers; check data.urls")

    def next_sample(self) -> RawSample:
        """The next raw sample: straight from the shards, or a seeded random pick from the full buffer."""
        if not self.buffer_size:
            return self._next_raw()
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._next_raw())
        pick = mix(self.plan.seed, SALT_SHUFFLE, self.stream, self.draws) % len(self.buffer)
        self.draws += 1
        chosen = self.buffer[pick]
        self.buffer[pick] = self.buffer[-1]  # O(1) removal; the order stays a pure function of the draws
        self.buffer.pop()
        return chosen

    def snapshot(self) -> dict:
        """Plain-data state (ints, lists, dicts, str): enough to continue exactly from here."""
        return {"k": self.k, "offset": self.offset, "draws": self.draws, "empty_run": self._empty_run,
                "empty_units": sorted(self._empty_units),
                "epoch": self.plan.unit(self.stream, self.k).epoch,
                "buffer": [[r.k, r.index] for r in self.buffer], "skips": self.skips.state()}

    def _restore(self, state: dict) -> None:
        self.k, self.offset, self.draws = int(state["k"]), int(state["offset"]), int(state["draws"])
        self._empty_run = int(state["empty_run"])
        self._empty_units = {int(u) for u in state["empty_units"]}
        self.skips.load(state["skips"])
        self.buffer = self.read_refs([(int(k), int(i)) for k, i in state["buffer"]], "in the saved shuffle buffer")

    def read_refs(self, refs: list[tuple[int, int]], where: str) -> list[RawSample]:
        """The raw samples at (unit read k, in-shard index) `refs`, in that order, read again from their shards.

        Raises DataError naming `where` they were kept when one can no longer be read (the shards changed)."""
        wanted: dict[int, set[int]] = {}
        for k, index in refs:
            wanted.setdefault(k, set()).add(index)
        found: dict[tuple[int, int], RawSample] = {}
        for k, indices in sorted(wanted.items()):
            remaining = len(indices)
            for raw in self._read_unit(k, min(indices), _ignore, wanted=indices):
                found[(k, raw.index)] = raw
                remaining -= 1
                if not remaining:
                    break  # the rest of this shard is not needed (a pipe: command is stopped)
        missing = [ref for ref in refs if ref not in found]
        if missing:
            k, index = missing[0]
            raise DataError(f"cannot resume the data stream: sample {index} of shard "
                            f"{self.plan.unit(self.stream, k).url} ({where}) can no longer be "
                            f"read; the shards changed since the checkpoint ({len(missing)} samples missing)")
        return [found[ref] for ref in refs]


class SampleDecoder:
    """Raw sample -> (uint8 image (S, S, 3) or (H, W, 3) of its bucket, or None; caption; {name: array}).

    Random crops are seeded by the sample's identity. `arrays` gives the dtype and shape of every precomputed
    array the spec requests (empty without precomputed shards). `buckets`: (height, width) shapes (buckets.py);
    empty for square images. With buckets and arrays precomputed per bucket, the crop those arrays were made from
    (precomputed_index.CROP_ARRAY) decides the sample's bucket; the image decoded here must have the same crop.
    """

    def __init__(self, spec: SampleSpec, caption_key: str, random_crop: bool, min_image_size: int,
                 max_aspect_ratio: float, seed: int, stream: int, arrays: dict[str, ArrayInfo] | None = None,
                 buckets: tuple[tuple[int, int], ...] = ()) -> None:
        self.caption_key = caption_key
        self.opts = (ImageOptions(spec.image_size, random_crop, min_image_size, max_aspect_ratio, buckets)
                     if spec.image_size else None)
        self.seed, self.stream = seed, stream
        self.arrays = arrays or {}
        self.loss_mask = spec.loss_mask and self.opts is not None
        # spec.decode_image False: the crop record of per-bucket arrays replaces decoding the image (training)
        self.from_record = not spec.decode_image and bool(buckets) and CROP_ARRAY in self.arrays

    def _from_record(self, raw: RawSample, caption: str) -> tuple[None, str, dict[str, np.ndarray], Crop]:
        """with_crop without decoding the image: arrays, bucket and crop from the per-bucket precompute."""
        skipped = skip_reason(raw.members)
        if skipped is not None:  # the precompute met the reader's own reason (e.g. corrupt_image): count it as such
            raise SkipSample(*skipped)
        arrays = {name: self._array(raw, name, info) for name, info in self.arrays.items()}
        crop = self._recorded_crop(raw, arrays.pop(CROP_ARRAY))
        assert crop is not None  # from_record implies buckets
        if self.loss_mask:
            arrays["loss_mask"] = decode_mask(raw.members, crop)
        return None, caption, arrays, crop

    def _recorded_crop(self, raw: RawSample, record: np.ndarray) -> Crop | None:
        """The Crop stored by a bucketed precompute (None when this decoder has no buckets: evaluation)."""
        if self.opts is None or not self.opts.buckets:
            return None
        orig_h, orig_w, top, left, height, width = (int(v) for v in record)
        if (height, width) not in self.opts.buckets:
            raise DataError(f"sample {raw.key}: its precomputed arrays were made for bucket {height}x{width}, which "
                            f"is not one of this run's data.buckets; re-run the precompute with this run's config")
        return Crop(self.opts.buckets.index((height, width)), orig_h, orig_w, top, left, height, width)

    def __call__(self, raw: RawSample) -> Decoded:
        image, caption, arrays, _ = self.with_crop(raw)
        return image, caption, arrays

    def with_crop(self, raw: RawSample) -> tuple[np.ndarray | None, str, dict[str, np.ndarray], Crop | None]:
        """As calling the decoder, plus where the image came from (None without an image)."""
        caption = read_caption(raw.members, self.caption_key)
        image, crop, mask = None, None, None
        if self.from_record:
            return self._from_record(raw, caption)
        if self.opts is not None:
            crop_seed = mix(self.seed, SALT_CROP, self.stream, raw.k, raw.index)
            image, crop = decode_with_crop(image_bytes(raw.members), self.opts, crop_seed)
            if self.loss_mask:
                mask = decode_mask(raw.members, crop)
        # The reader's own checks come first, so a sample with e.g. a corrupt image is counted as such, as it
        # would be without precomputed shards; only samples it accepts can lack arrays.
        arrays = {name: self._array(raw, name, info) for name, info in self.arrays.items()}
        if CROP_ARRAY in arrays:
            recorded = self._recorded_crop(raw, arrays.pop(CROP_ARRAY))
            if crop is not None and recorded is not None and crop != recorded:
                raise DataError(f"sample {raw.key}: its precomputed arrays were made from crop {recorded}, the loader "
                                f"crops {crop}: the precompute used other bucket or image settings than this run; "
                                f"re-run `shards precompute --buckets-config` with this run's config")
            crop = recorded or crop
        if mask is not None:
            arrays["loss_mask"] = mask
        return image, caption, arrays, crop

    @staticmethod
    def _array(raw: RawSample, name: str, info: ArrayInfo) -> np.ndarray:
        data = raw.members.get(pre_key(name))
        if data is None:
            raise SkipSample("precomputed_missing", f"{name}: {skip_note(raw.members)}")
        try:
            array = read_npy(data)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"sample {raw.key}: precomputed array {name!r} cannot be read ({exc}); the precomputed "
                            f"shard is corrupt: re-run the precompute") from None
        if not info.fits(str(array.dtype), tuple(array.shape)):
            raise DataError(f"sample {raw.key}: precomputed array {name!r} is {array.dtype} {tuple(array.shape)}, "
                            f"its shards.json says {info.dtype} {info.shape}; re-run the precompute")
        return array


def batch_arrays(spec: SampleSpec) -> tuple[str, ...]:
    """The per-sample arrays a batch collects besides images and captions: the precomputed ones, and the loss mask
    when the stage asks for it (decoded with the image)."""
    return (*spec.precomputed, *(("loss_mask",) if spec.loss_mask and spec.image_size else ()))


def next_batch(samples: Iterator[RawSample], decode: SampleDecoder, spec: SampleSpec, batch_size: int,
               skips: SkipCounter, shared: bool = False) -> dict | None:
    """Decode samples until `batch_size` are usable (skips counted and checked) and collate them.

    shared: build the image tensor in shared memory (set inside DataLoader workers).

    Returns the batch dict of spec.py, or None when `samples` ran out before any usable sample.
    """
    images, captions, keys = [], [], []
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in batch_arrays(spec)}
    for raw in samples:
        skips.seen += 1
        try:
            image, caption, extra = decode(raw)
        except SkipSample as skip:
            skips.add(skip.reason, f"{raw.key}: {skip.detail}")
            skips.check()
            continue
        images.append(image)
        captions.append(caption)
        keys.append(raw.key)
        for name in arrays:
            arrays[name].append(extra[name])
        if len(keys) == batch_size:
            break
    if not keys:
        return None
    return collate(images, captions, keys, spec, shared, arrays)


def next_bucket_batch(samples: Iterator[RawSample], decode: SampleDecoder, spec: SampleSpec,
                      batcher: BucketBatcher, skips: SkipCounter, shared: bool = False) -> dict:
    """Decode samples into their buckets until one bucket holds a micro-batch; collate that bucket.

    Returns the batch dict of spec.py with images (B, 3, H, W) of one bucket shape plus orig_size,
    crop_top_left and target_size (int64 (B, 2)). The stream is infinite, so a batch always comes.
    """
    for raw in samples:
        skips.seen += 1
        try:
            image, caption, extra, crop = decode.with_crop(raw)
        except SkipSample as skip:
            skips.add(skip.reason, f"{raw.key}: {skip.detail}")
            skips.check()
            continue
        full = batcher.add(crop.bucket, Waiting(raw.k, raw.index, raw.key, (image, caption, extra, crop)))
        if full is not None:
            images, captions, extras, crops = zip(*(w.decoded for w in full))
            arrays = {name: [e[name] for e in extras] for name in batch_arrays(spec)}
            return collate(list(images), list(captions), [w.key for w in full], spec, shared, arrays, list(crops))
    raise DataError("the training data stream ended, which should never happen; please report this")


def restore_buckets(batcher: BucketBatcher, state: list, stream: SampleStream, decode: SampleDecoder) -> None:
    """Refill `batcher` from a snapshot: its waiting samples are read again and decoded like the first time."""
    def load(refs: list[tuple[int, int, str]]) -> list[tuple]:
        raws = stream.read_refs([(k, i) for k, i, _ in refs], "waiting in a bucket")
        for raw, (_, _, key) in zip(raws, refs):
            if raw.key != key:
                raise DataError(f"cannot resume the data stream: the sample waiting in a bucket as {key!r} is "
                                f"{raw.key!r} now; the shards changed since the checkpoint")
        return [decode.with_crop(raw) for raw in raws]
    batcher.restore(state, load)


def stream_samples(stream: SampleStream) -> Iterator[RawSample]:
    """The infinite sample iterator of a SampleStream."""
    while True:
        yield stream.next_sample()
