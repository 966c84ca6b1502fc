"""The reader with precomputed arrays: batches carry the stored arrays of their own samples, alignment is
validated at construction (one clear DataError, before any worker starts), misalignment while streaming stops the
run, bad samples stay aligned, and exact resume keeps working."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_helpers import check_resume, data_config, take, write_tar
from precompute_helpers import BAD_IMAGE_KEY, NO_CAPTION_KEY, T5_MAXLEN, copy_setup, read_shard, stored_arrays
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.spec import SampleSpec
from pipeline.errors import DataError

T5_SPEC = SampleSpec(image_size=16, precomputed=("t5_emb", "t5_mask"))
PRIOR_SPEC = SampleSpec(image_size=0, precomputed=("clip_text_emb", "clip_image_emb"))  # no image decoded


def _train(src, pre, spec=T5_SPEC, *, batch_size=4, seed=0, rank=0, world_size=1, **cfg):
    data = data_config(src, precomputed_urls=str(pre), resolution=16, **cfg)
    return build_train_loader(data, spec, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)


def _eval(src, pre, spec=T5_SPEC, **cfg):
    data = data_config((), eval_urls=str(src), eval_precomputed_urls=str(pre), resolution=16, **cfg)
    return build_eval_loader(data, spec, batch_size=4, max_samples=100, rank=0, world_size=1)


def _assert_arrays_match(batches, stored, spec):
    for batch in batches:
        for name in spec.precomputed:
            expected = torch.from_numpy(np.stack([stored[k][name] for k in batch["key"]]))
            assert batch[name].dtype == expected.dtype and torch.equal(batch[name], expected), name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_batches_carry_their_own_samples_arrays(precomputed, num_workers):
    loader = _train(precomputed.src, precomputed.pre, num_workers=num_workers, shuffle_buffer=6)
    batches = take(iter(loader), 8)
    loader.close()
    first = batches[0]
    assert first["image"].dtype == torch.uint8 and first["t5_emb"].shape == (4, T5_MAXLEN, 32)
    assert first["t5_emb"].dtype == torch.float16 and first["t5_mask"].dtype == torch.bool
    _assert_arrays_match(batches, stored_arrays(precomputed.pre), T5_SPEC)
    keys = {k for b in batches for k in b["key"]}
    assert BAD_IMAGE_KEY not in keys and NO_CAPTION_KEY not in keys  # the reader's own checks still apply
    assert set(loader.skip_counts()) == {"corrupt_image", "missing_caption"}  # 32 samples: about 1.3 epochs


def test_eval_batches_carry_arrays_and_a_prior_spec_skips_what_the_precompute_could_not_encode(precomputed):
    stored = stored_arrays(precomputed.pre)
    batches = list(_eval(precomputed.src, precomputed.pre))
    assert len([k for b in batches for k in b["key"]]) == 25
    _assert_arrays_match(batches, stored, T5_SPEC)
    prior = _eval(precomputed.src, precomputed.pre, PRIOR_SPEC)
    batches = list(prior)
    keys = [k for b in batches for k in b["key"]]
    # No image is decoded for this spec, so the corrupt image only shows as its missing embedding.
    assert len(keys) == 25 and BAD_IMAGE_KEY not in keys and NO_CAPTION_KEY not in keys
    assert prior.skip_counts() == {"precomputed_missing": 1, "missing_caption": 1}
    assert set(batches[0]) == {"caption", "key", "clip_text_emb", "clip_image_emb"}
    _assert_arrays_match(batches, stored, PRIOR_SPEC)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_arrays_is_bitwise(precomputed, num_workers):
    spec = SampleSpec(image_size=16, precomputed=("t5_emb", "t5_mask", "clip_image_emb"))
    batches = check_resume(lambda: _train(precomputed.src, precomputed.pre, spec, num_workers=num_workers,
                                          shuffle_buffer=8, crop="random", seed=3), 5, 6)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 44 and len(set(keys)) >= 20  # 44 draws of 25 usable samples: across an epoch boundary


def test_fewer_shards_than_streams_split_the_zipped_shards_by_index(precomputed):
    stored = stored_arrays(precomputed.pre)
    seen = []
    for rank in range(4):  # 3 shards, 4 streams: 6 units (halves of shards by sample index), >= 3 samples each
        loader = _train(precomputed.src, precomputed.pre, rank=rank, world_size=4, batch_size=3)
        batches = take(iter(loader), 1)
        _assert_arrays_match(batches, stored, T5_SPEC)
        seen.append({k for b in batches for k in b["key"]})
    assert not any(seen[i] & seen[j] for i in range(4) for j in range(i))


def _damage_missing_shard(src, pre):
    (pre / "shard-000002.tar").unlink()


def _damage_count(src, pre):
    index = json.loads((src / "shards.json").read_text())
    index["shards"][1]["num_samples"] = 8
    (src / "shards.json").write_text(json.dumps(index))


def _damage_source_changed(src, pre):
    samples = read_shard(src / "shard-000000.tar")
    samples[4][1]["jpg"] += b"\0" * 20000  # a re-encoded image: the shard grows past its last 10 KiB tar record
    write_tar(src / "shard-000000.tar", samples)


def _damage_precomputed_truncated(src, pre):
    shard = pre / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:15000])


def _damage_extra_shard(src, pre):
    write_tar(pre / "shard-000099.tar", [])


def _damage_incomplete_parts(src, pre):
    (pre / "shards.json").unlink()
    part = json.loads((pre / "shards.part-0.json").read_text())
    (pre / "shards.part-0.json").write_text(json.dumps({**part, "complete": False}))


@pytest.mark.parametrize("damage,message", [
    (_damage_missing_shard, r"source shard .*shard-000002.tar \(data.urls\) has no precomputed shard"),
    (_damage_count, r"shard-000001.tar has 8 samples \(its shards.json\) but the precompute in .* was computed "
                    r"from 9"),
    (_damage_source_changed, r"source shard .*shard-000000.tar changed since the precompute \(\d+ bytes now"),
    (_damage_precomputed_truncated, r"precomputed shard .*shard-000001.tar has 15000 bytes but its shards.json"),
    (_damage_extra_shard, r"precomputed shard .*shard-000099.tar has no source shard in data.urls"),
    (_damage_incomplete_parts, r"incomplete: part\(s\) \[0\] of 1"),
])
def test_misalignment_fails_at_construction(precomputed, tmp_path, damage, message):
    src, pre = copy_setup(precomputed, tmp_path)
    damage(src, pre)
    with pytest.raises(DataError, match=message):
        _train(src, pre, num_workers=2)
    eval_message = message.replace("data.urls", "data.eval_urls")
    with pytest.raises(DataError, match=eval_message):
        _eval(src, pre)


def test_requested_arrays_must_exist_and_have_shards(precomputed):
    spec = SampleSpec(image_size=16, precomputed=("latents",))
    with pytest.raises(DataError, match=r"arrays \['latents'\] that no directory in data.precomputed_urls provides "
                                        r"\(available: \['clip_image_emb', 'clip_text_emb', 't5_emb', 't5_mask'\]"):
        _train(precomputed.src, precomputed.pre, spec)
    data = data_config(precomputed.src, resolution=16)
    with pytest.raises(DataError, match=r"reads precomputed arrays \['t5_emb', 't5_mask'\] but "
                                        r"data.precomputed_urls is empty"):
        build_train_loader(data, T5_SPEC, batch_size=2, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="data.eval_precomputed_urls is empty"):
        build_eval_loader(data_config((), eval_urls=str(precomputed.src)), T5_SPEC, batch_size=2, max_samples=4,
                          rank=0, world_size=1)
    with pytest.raises(DataError, match="must name distinct arrays other than image"):
        _train(precomputed.src, precomputed.pre, SampleSpec(image_size=16, precomputed=("image",)))


@pytest.mark.parametrize("num_workers,change,message", [
    (0, "swap", r"shard-000002.tar is misaligned with source shard .*shard-000002.tar: sample 0 is 'train00000018' "
                r"in the source but 'train00000019'"),
    (2, "swap", r"shard-000002.tar is misaligned"),
    (0, "drop_last", r"precomputed shard .*shard-000002.tar ends before sample 8 \('train00000026'\) of source"),
])
def test_misalignment_while_streaming_is_an_error_not_a_skip(precomputed, tmp_path, num_workers, change, message):
    src, pre = copy_setup(precomputed, tmp_path)
    samples = read_shard(pre / "shard-000002.tar")
    size = (pre / "shard-000002.tar").stat().st_size
    if change == "swap":
        write_tar(pre / "shard-000002.tar", [samples[1], samples[0], *samples[2:]])
        assert (pre / "shard-000002.tar").stat().st_size == size  # tar pads to 10 KiB: start-up checks can't see it
    else:  # one sample short, and an index that (wrongly) agrees with the file
        write_tar(pre / "shard-000002.tar", samples[:-1])
        index = json.loads((pre / "shards.json").read_text())
        index["shards"][2]["num_bytes"] = (pre / "shard-000002.tar").stat().st_size
        (pre / "shards.json").write_text(json.dumps(index))
    loader = _train(src, pre, num_workers=num_workers, shuffle_shards=False, batch_size=9)
    with pytest.raises(DataError, match=message):
        take(iter(loader), 4)
    loader.close()


def test_a_source_sample_edited_in_place_is_an_error_while_streaming(precomputed, tmp_path):
    src, pre = copy_setup(precomputed, tmp_path)
    samples = read_shard(src / "shard-000000.tar")
    key, members = samples[2]
    samples[2] = (key, {**members, "txt": members["txt"].replace(b"a ", b"A ", 1)})  # re-captioned, same size
    size = (src / "shard-000000.tar").stat().st_size
    write_tar(src / "shard-000000.tar", samples)
    assert (src / "shard-000000.tar").stat().st_size == size
    loader = _train(src, pre, shuffle_shards=False, batch_size=9)
    with pytest.raises(DataError, match=rf"sample '{key}' of source shard .*shard-000000.tar changed since the "
                                        r"precompute .* the precomputed arrays are stale"):
        take(iter(loader), 1)


def test_arrays_from_several_precompute_directories_and_piped_sources(precomputed, tmp_path):
    from precompute_helpers import precompute

    t5_dir, clip_dir = tmp_path / "t5", tmp_path / "clip"
    assert precompute(precomputed, precomputed.src, t5_dir, arrays=("t5_emb",)) == 0
    assert precompute(precomputed, precomputed.src, clip_dir, arrays=("clip_image_emb",)) == 0
    spec = SampleSpec(image_size=16, precomputed=("t5_mask", "clip_image_emb"))
    piped = tuple(f"pipe:cat {p}" for p in sorted(precomputed.src.glob("*.tar")))  # names only: no size checks
    data = data_config(piped, precomputed_urls=(str(t5_dir), str(clip_dir)), resolution=16, num_workers=2)
    loader = build_train_loader(data, spec, batch_size=5, seed=0, rank=0, world_size=1)
    batches = take(iter(loader), 4)
    loader.close()
    _assert_arrays_match(batches, stored_arrays(precomputed.pre), spec)
    both = data_config(precomputed.src, precomputed_urls=(str(t5_dir), str(precomputed.pre)), resolution=16)
    with pytest.raises(DataError, match=r"array 't5_mask' is provided by both .*t5 and .*pre; name only one"):
        build_train_loader(both, spec, batch_size=5, seed=0, rank=0, world_size=1)
