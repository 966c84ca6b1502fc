"""Bad data is skipped, counted by reason and logged once; too much of it, or none readable, is a clear DataError."""
from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import pytest

from data_helpers import (SPEC, assert_same_batches, data_config, good_sample, jpeg_bytes, take, toy_tokenize,
                          write_tar)
from pipeline.data.loader import build_eval_loader, build_train_loader
from pipeline.data.spec import SampleSpec
from pipeline.data.tar_reader import iter_shard
from pipeline.errors import DataError

EXPECTED = {"corrupt_image": 1, "empty_image": 1, "missing_caption": 1, "empty_caption": 1,
            "bad_caption_encoding": 1, "image_too_small": 1, "missing_image": 1, "bad_aspect_ratio": 1,
            "truncated_shard": 1, "unreadable_shard": 2, "missing_shard": 1}
GOOD_KEYS = {f"s{i:05d}" for i in [*range(12), *range(14, 18)]}
BAD_OPTIONS = dict(min_image_size=10, max_aspect_ratio=3.0)


def _truncated_shard(path: Path) -> None:
    """Samples 6..13, cut in the middle of sample 12's image: 6..11 survive."""
    write_tar(path, (good_sample(i) for i in range(6, 14)))
    with tarfile.open(path) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "s00012.jpg").offset_data + 100
    path.write_bytes(path.read_bytes()[:cut])


@pytest.fixture(scope="module")
def bad_urls(tmp_path_factory) -> tuple[str, ...]:
    root = tmp_path_factory.mktemp("bad")
    shards = root / "shards"
    shards.mkdir()
    bad = [
        ("b_garbage", {"jpg": b"\xff\xd8 this is not a jpeg", "txt": b"garbage"}),
        ("b_zero", {"jpg": b"", "txt": b"zero bytes"}),
        ("b_notxt", {"jpg": jpeg_bytes(20, 14, 1)}),
        ("b_empty", {"jpg": jpeg_bytes(20, 14, 2), "txt": b"  \n"}),
        ("b_latin", {"jpg": jpeg_bytes(20, 14, 3), "txt": "caf\u00e9".encode("latin-1")}),
        ("b_small", {"jpg": jpeg_bytes(6, 6, 4), "txt": b"tiny"}),
        ("b_noimg", {"txt": b"no image"}),
        ("b_wide", {"jpg": jpeg_bytes(60, 12, 5), "txt": b"panorama"}),
    ]
    mixed = [good_sample(i // 2) if i % 2 == 0 else bad[i // 2] for i in range(12)] + bad[6:]  # s0, b, s1, b, ...
    write_tar(shards / "shard-000000.tar", mixed)
    _truncated_shard(shards / "shard-000001.tar")
    write_tar(root / "extra-0.tar", (good_sample(i) for i in range(14, 18)))
    return (str(shards), "pipe:false", f"pipe:cat {root / 'missing.tar'}", str(root / "extra-{0..1}.tar"))


def test_eval_pass_counts_every_reason_exactly(bad_urls, caplog):
    data = data_config((), eval_urls=bad_urls, **BAD_OPTIONS)
    loader = build_eval_loader(data, SPEC, batch_size=4, max_samples=1000, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        keys = [k for batch in loader for k in batch["key"]]
        keys_again = [k for batch in loader for k in batch["key"]]
    assert set(keys) == GOOD_KEYS and len(keys) == len(GOOD_KEYS) and keys == keys_again
    assert loader.skip_counts() == EXPECTED
    logged = [r.getMessage() for r in caplog.records]
    for reason in EXPECTED:  # once per reason, although two passes met each of them
        assert sum(f"skipping {reason} " in m for m in logged) == 1, reason


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_goes_on_and_logs_each_reason_once(bad_urls, caplog, num_workers):
    data = data_config(bad_urls, num_workers=num_workers, shuffle_buffer=4, **BAD_OPTIONS)
    loader = build_train_loader(data, SPEC, batch_size=4, seed=0, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        keys = [k for batch in take(iter(loader), 12) for k in batch["key"]]  # 48 samples: about 3 epochs
    loader.close()
    assert set(keys) == GOOD_KEYS
    counts = loader.skip_counts()
    assert set(counts) == set(EXPECTED)
    assert all(counts[r] >= n for r, n in EXPECTED.items())
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(EXPECTED) and all(sum(f"skipping {r} " in m for m in logged) == 1 for r in EXPECTED)


def test_skip_counts_resume_with_the_stream(bad_urls):
    data = data_config(bad_urls, shuffle_buffer=4, **BAD_OPTIONS)
    make = lambda: build_train_loader(data, SPEC, batch_size=3, seed=1, rank=0, world_size=1)  # noqa: E731
    reference = make()
    ref = take(iter(reference), 9)
    first = make()
    take(iter(first), 4)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert resumed.skip_counts() == first.skip_counts()
    assert_same_batches(take(iter(resumed), 5), ref[4:])
    assert resumed.skip_counts() == reference.skip_counts()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_shard_failing_is_an_error_not_a_hang(tmp_path, num_workers):
    (tmp_path / "zero.tar").write_bytes(b"")
    data = data_config(("pipe:false", f"pipe:cat {tmp_path / 'nothing.tar'}", str(tmp_path / "zero.tar")),
                       num_workers=num_workers)
    loader = build_train_loader(data, SPEC, batch_size=2, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="every shard failed") as info:
        next(iter(loader))
    assert "unreadable_shard=" in str(info.value) and "Traceback" not in str(info.value)


@pytest.mark.parametrize("resampled", [False, True])
def test_some_bad_shards_in_a_row_are_not_an_error(tmp_path, resampled):
    write_tar(tmp_path / "good.tar", [good_sample(0)])
    data = data_config((str(tmp_path / "good.tar"), "pipe:false"), resampled=resampled)
    loader = build_train_loader(data, SPEC, batch_size=5, seed=0, rank=0, world_size=1)
    keys = [k for b in take(iter(loader), 30) for k in b["key"]]  # ~150 reads of a 50 % failing shard list
    assert set(keys) == {"s00000"} and loader.skip_counts()["unreadable_shard"] > 20


def test_too_many_skips_stop_the_run(tmp_path):
    samples = []
    for i in range(20):
        samples.append(good_sample(i))
        samples.append((f"bad{i:03d}", {"jpg": b"junk", "txt": b"junk"}))
    write_tar(tmp_path / "half-bad.tar", samples)
    data = data_config(str(tmp_path), max_skip_fraction=0.2, skip_check_min_samples=10)
    loader = build_train_loader(data, SPEC, batch_size=4, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"corrupt_image=\d+.*max_skip_fraction=0.2"):
        take(iter(loader), 10)


def test_worker_exception_surfaces_in_the_main_process(rect_shards):
    def broken_tokenize(captions):
        raise ValueError("tokenizer boom")

    spec = SampleSpec(image_size=12, tokenize=broken_tokenize)
    loader = build_train_loader(data_config(rect_shards, num_workers=2), spec, batch_size=2, seed=0, rank=0,
                                world_size=1)
    with pytest.raises(ValueError, match="tokenizer boom"):
        next(iter(loader))


@pytest.mark.parametrize("urls,message", [
    ("{root}/missing.tar", "'{root}/missing.tar' matches no file"),
    ("{root}/nope-{{0..3}}.tar", "matches no file \\(4 expanded names"),
    ("{root}/empty", "contains no \\*.tar shards"),
    ("", "data.urls is empty"),
])
def test_spec_matching_nothing_fails_at_construction(tmp_path, urls, message):
    (tmp_path / "empty").mkdir()
    root = str(tmp_path)
    with pytest.raises(DataError, match=message.format(root=root)):
        build_train_loader(data_config(urls.format(root=root)), SPEC, batch_size=2, seed=0, rank=0, world_size=1)


def test_missing_eval_urls_fail_at_construction(rect_shards):
    with pytest.raises(DataError, match="data.eval_urls is empty"):
        build_eval_loader(data_config(rect_shards), SPEC, batch_size=2, max_samples=4, rank=0, world_size=1)


@pytest.mark.parametrize("cut_into,survivors", [("s00003.jpg", 3), ("s00003.txt", 3), ("s00002.txt", 2)])
def test_truncated_shard_keeps_complete_samples_only(tmp_path, cut_into, survivors):
    path = write_tar(tmp_path / "t.tar", (good_sample(i) for i in range(5)))
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name == cut_into)
    for cut in (member.offset_data + 10, member.offset + 100):  # inside the data, inside the header
        path.write_bytes(write_tar(tmp_path / "full.tar", (good_sample(i) for i in range(5))).read_bytes()[:cut])
        events: list = []
        keys = [key for _, key, _ in iter_shard(str(path), lambda r, d: events.append(r))]
        assert events == ["truncated_shard"]
        # a cut inside a header may hide that the previous sample was complete: it is dropped too
        assert keys[:survivors - 1] == [f"s{i:05d}" for i in range(survivors - 1)]
        assert len(keys) in (survivors - 1, survivors) and all(k < f"s{survivors:05d}" for k in keys)


def test_partial_sample_from_truncation_is_not_yielded_with_missing_members(tmp_path):
    path = write_tar(tmp_path / "t.tar", (good_sample(i) for i in range(3)))
    with tarfile.open(path) as tar:
        txt = next(m for m in tar.getmembers() if m.name == "s00001.txt")
    path.write_bytes(path.read_bytes()[:txt.offset])  # cut exactly before s00001.txt's header
    events: list = []
    samples = list(iter_shard(str(path), lambda r, d: events.append(r)))
    assert [key for _, key, _ in samples] == ["s00000"] and events == ["truncated_shard"]
    assert toy_tokenize(["x"])["text"].shape == (1, 8)
