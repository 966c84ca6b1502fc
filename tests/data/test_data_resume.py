"""Exact resume of the training stream: after state_dict -> fresh loader -> load_state_dict, the next batches are
bit-identical to an uninterrupted run's (workers 0 and 2, shuffle buffer on, across epoch boundaries, 2 ranks)."""
from __future__ import annotations

import pytest

from data_helpers import SPEC, assert_same_batches, check_resume, data_config, roundtrip as _roundtrip, take
from pipeline.data.loader import build_train_loader
from pipeline.errors import DataError


def _loader(urls, *, seed=7, rank=0, world_size=1, batch_size=4, **cfg):
    return build_train_loader(data_config(urls, **cfg), SPEC, batch_size=batch_size, seed=seed, rank=rank,
                              world_size=world_size)


def _check_resume(urls, consumed: int, following: int, **kw) -> list[dict]:
    return check_resume(lambda: _loader(urls, **kw), consumed, following)


@pytest.mark.parametrize("num_workers,consumed,following", [(0, 10, 6), (2, 9, 8)])
def test_resume_is_bitwise_with_shuffle_buffer_across_epochs(rect_shards, num_workers, consumed, following):
    # 50 samples, batch 4: with 1 stream an epoch is ~12 batches, with 2 streams ~6 per worker, so the
    # batches after the resume point cross an epoch boundary; consumed=9 resumes at worker 1 (odd count).
    batches = _check_resume(rect_shards, consumed, following, num_workers=num_workers, shuffle_buffer=12,
                            crop="random")
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) > 50  # the reference run really went past one epoch
    assert len(set(keys[:50])) > 40  # and shuffled, not repeated


def test_resume_before_every_worker_produced_a_batch(rect_shards):
    _check_resume(rect_shards, 1, 4, num_workers=2, shuffle_buffer=12)  # worker 1 has no snapshot yet


def test_resume_two_ranks_and_ranks_are_disjoint(rect_shards):
    for rank in (0, 1):
        _check_resume(rect_shards, 5, 4, rank=rank, world_size=2, shuffle_buffer=6)
    keys = []
    # 5 shards over 2 ranks: in epoch 0 rank 0 reads shard positions 0, 2, 4 (30 samples), rank 1 positions
    # 1, 3 (20 samples) and then position 5, the first of epoch 1.
    for rank, batches in ((0, 6), (1, 4)):
        loader = _loader(rect_shards, rank=rank, world_size=2, batch_size=5)
        keys.append([k for b in take(iter(loader), batches) for k in b["key"]])
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 50


def test_resume_resampled_mode(rect_shards):
    _check_resume(rect_shards, 7, 5, resampled=True, shuffle_buffer=8)


def test_reiterating_continues_where_it_stopped(rect_shards):
    reference = take(iter(_loader(rect_shards, shuffle_buffer=8)), 8)
    loader = _loader(rect_shards, shuffle_buffer=8)
    got = take(iter(loader), 3) + take(iter(loader), 5)
    loader.close()
    assert_same_batches(got, reference)


def test_state_is_plain_data_and_carries_skip_counts(rect_shards, tmp_path):
    loader = _loader(rect_shards, num_workers=0, shuffle_buffer=4)
    take(iter(loader), 2)
    state = loader.state_dict()
    assert state["batches"] == 2 and state["next_worker"] == 0 and state["world_size"] == 1
    assert state["workers"][0]["k"] >= 0 and len(state["workers"][0]["buffer"]) == 3  # one drawn out
    assert _roundtrip(state) == state
    fresh = _loader(rect_shards, num_workers=0, shuffle_buffer=4)
    fresh.load_state_dict(state)
    assert fresh.skip_counts() == loader.skip_counts() == {}


@pytest.mark.parametrize("change,message", [
    ({"world_size": 2}, "world_size=1"),
    ({"num_workers": 2}, "streams=1"),
    ({"seed": 8}, "seed=7"),
    ({"shuffle_shards": False}, "shard list changed"),
])
def test_incompatible_state_raises(rect_shards, change, message):
    loader = _loader(rect_shards)
    take(iter(loader), 1)
    state = loader.state_dict()
    other = _loader(rect_shards, **change)
    with pytest.raises(DataError, match=message):
        other.load_state_dict(state)


def test_state_of_other_rank_is_refused(rect_shards):
    state = _loader(rect_shards, rank=0, world_size=2).state_dict()
    with pytest.raises(DataError, match="rank=0"):
        _loader(rect_shards, rank=1, world_size=2).load_state_dict(state)


def test_changed_shards_fail_to_resume(rect_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(rect_shards, copy)
    loader = _loader(copy, shuffle_buffer=12)
    take(iter(loader), 2)
    state = loader.state_dict()
    for shard in copy.glob("*.tar"):  # same names, but every shard is now empty of samples
        shard.write_bytes(b"\0" * 1024)
    fresh = _loader(copy, shuffle_buffer=12)
    fresh.load_state_dict(state)
    with pytest.raises(DataError, match="shards changed since the checkpoint"):
        next(iter(fresh))
