"""One deterministic evaluation pass: shards in the given order, no shuffling, this rank's and worker's share.

Samples are numbered globally across the shards in order (0, 1, 2, ...); only those with number
< max_samples are used, so the whole run evaluates at most `max_samples`. Rank r owns the numbers
``g % world_size == r``; its own samples, numbered j = 0, 1, ..., form batches ``j // batch_size``; worker w
decodes batches ``b % num_workers == w``. The DataLoader hands out worker batches round-robin, so a rank sees its
batches in order 0, 1, 2, ... and only the last one is short (or one whose samples were skipped). Ranks differ
by at most one sample, so their batch counts differ by at most one: reduce metrics as (sum, count) pairs at the
end rather than running a collective per batch. Every worker scans the shard headers (cheap: bytes of samples
that are not its own are never read) to keep the global numbering.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.data.skips import SkipCounter
from pipeline.data.stream import RawSample, SampleDecoder, ShardReader, next_batch
from pipeline.data.spec import SampleSpec
from pipeline.data.tar_reader import iter_shard
from pipeline.errors import DataError


@dataclass(frozen=True)
class EvalShare:
    """Which samples one worker of one rank evaluates."""

    rank: int
    world_size: int
    worker: int
    num_workers: int
    batch_size: int
    max_samples: int

    def batch_of(self, number: int) -> int | None:
        """The rank-local batch of global sample `number` if this worker decodes it, else None."""
        if number >= self.max_samples or number % self.world_size != self.rank:
            return None
        batch = (number // self.world_size) // self.batch_size
        return batch if batch % self.num_workers == self.worker else None


def _owned_samples(urls: list[str], share: EvalShare, skips: SkipCounter,
                   read: ShardReader) -> Iterator[tuple[int, RawSample]]:
    """(batch number, raw sample) for this worker's samples, in order."""
    base, readable = 0, 0
    for url in urls:
        if base >= share.max_samples:
            break
        count = [0]

        def keep(index: int, base: int = base, count: list[int] = count) -> bool:
            count[0] = index + 1  # called for every sample header, so this ends as the shard's sample count
            return share.batch_of(base + index) is not None

        for index, key, members in read(url, skips.add, 0, keep):
            yield share.batch_of(base + index), RawSample(0, index, key, members)  # type: ignore[misc]
        readable += count[0] > 0
        base += count[0]
    if urls and not readable:
        raise DataError(f"no evaluation shard could be read ({', '.join(f'{r}={n}' for r, n in skips.counts.items())}"
                        f"; first: {next(iter(skips.notes.values()), 'no samples')}); check data.eval_urls")


def eval_batches(urls: list[str], share: EvalShare, decode: SampleDecoder, spec: SampleSpec,
                 skips: SkipCounter, shared: bool = False, read: ShardReader = iter_shard) -> Iterator[dict]:
    """This worker's evaluation batches (dicts of spec.py), in batch order; `shared` as in next_batch;
    `read` reads one shard (iter_shard, or an AlignedReader zipping in precomputed arrays)."""
    owned = _owned_samples(urls, share, skips, read)
    pending: tuple[int, RawSample] | None = next(owned, None)
    while pending is not None:
        number = pending[0]

        def same_batch() -> Iterator[RawSample]:
            nonlocal pending
            while pending is not None and pending[0] == number:
                raw = pending[1]
                pending = next(owned, None)
                yield raw

        batch = next_batch(same_batch(), decode, spec, share.batch_size, skips, shared)
        if batch is not None:
            yield batch
