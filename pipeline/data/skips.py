"""Counting what the reader skips, and deciding when skipping has gone too far.

Sample reasons (the sample is dropped, the batch takes the next one):
    missing_image, empty_image, corrupt_image, image_too_small (short side below data.min_image_size, auto by
    default), bad_aspect_ratio (beyond data.max_aspect_ratio, or the widest bucket with data.buckets),
    missing_caption, empty_caption, bad_caption_encoding, bad_json,
    precomputed_missing (the reader accepts the sample but the precompute could not encode it: KEY.skip),
    corrupt_mask (a loss mask KEY.mask.png that cannot be decoded or does not have the image's aspect ratio)
Shard reasons (the rest of the shard is dropped, reading moves to the next shard):
    missing_shard, unreadable_shard (cannot open / not a tar / pipe command failed), truncated_shard

Counts are cumulative per stream (worker) and travel with every batch, so the loader's ``skip_counts()``
reflects batches consumed, like its state. Each reason is logged once per loader (see loader.py).
"""
from __future__ import annotations

from collections.abc import Iterable

from pipeline.errors import DataError

SAMPLE_REASONS = ("missing_image", "empty_image", "corrupt_image", "image_too_small", "bad_aspect_ratio",
                  "missing_caption", "empty_caption", "bad_caption_encoding", "bad_json", "precomputed_missing",
                  "corrupt_mask")
SHARD_REASONS = ("missing_shard", "unreadable_shard", "truncated_shard")


class SkipCounter:
    """Cumulative skip counts of one stream plus the number of samples it tried to decode.

    Args:
        max_fraction: skipped/seen above this raises DataError (1.0 never raises) ...
        min_seen: ... once at least this many samples were seen (a few early failures prove nothing).
    """

    def __init__(self, max_fraction: float, min_seen: int) -> None:
        self.max_fraction = max_fraction
        self.min_seen = min_seen
        self.counts: dict[str, int] = {}
        self.notes: dict[str, str] = {}  # first detail per reason, for the one log line
        self.seen = 0

    def add(self, reason: str, detail: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.notes.setdefault(reason, detail[:300])

    def sample_skips(self) -> int:
        return sum(n for r, n in self.counts.items() if r not in SHARD_REASONS)

    def check(self) -> None:
        """Raise DataError if too large a fraction of the samples seen so far was skipped."""
        check_fraction(self.sample_skips(), self.seen, self.max_fraction, self.min_seen, self.counts)

    def state(self) -> dict:
        return {"counts": dict(self.counts), "notes": dict(self.notes), "seen": self.seen}

    def load(self, state: dict) -> None:
        self.counts = dict(state["counts"])
        self.notes = dict(state["notes"])
        self.seen = int(state["seen"])


def check_fraction(skipped: int, seen: int, max_fraction: float, min_seen: int, counts: dict[str, int]) -> None:
    if max_fraction < 1.0 and seen >= max(1, min_seen) and skipped > max_fraction * seen:
        raise DataError(f"{skipped} of {seen} samples were skipped ({format_counts(counts)}), more than "
                        f"data.max_skip_fraction={max_fraction}; fix the shards or raise the limit")


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{r}={n}" for r, n in sorted(counts.items())) or "none"


def merge_counts(states: Iterable[dict | None]) -> tuple[dict[str, int], dict[str, str], int]:
    """Sum the counts of several streams' SkipCounter states -> (counts, first notes, samples seen)."""
    counts: dict[str, int] = {}
    notes: dict[str, str] = {}
    seen = 0
    for state in states:
        if not state:
            continue
        for reason, n in state["counts"].items():
            counts[reason] = counts.get(reason, 0) + n
        for reason, note in state["notes"].items():
            notes.setdefault(reason, note)
        seen += state["seen"]
    return counts, notes, seen
