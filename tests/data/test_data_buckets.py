"""Aspect-ratio buckets: shapes, nearest-aspect assignment with the least crop, one bucket per micro-batch, nothing
lost (every key of a mixed-aspect epoch exactly once), skips by reason, and bit-identical resume with samples
waiting in partly filled buckets (workers 0 and 2, 2 ranks)."""
from __future__ import annotations

import io
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import SPEC, check_resume, data_config, jpeg_bytes, take, toy_tokenize, write_tar
from pipeline.config import BucketConfig
from pipeline.data.spec import SampleSpec
from pipeline.data.buckets import bucket_shapes, nearest_bucket, resolve_shapes
from pipeline.data.loader import build_train_loader
from pipeline.data.synthetic import make_sample
from pipeline.data.transforms import ImageOptions, decode_with_crop
from pipeline.errors import ConfigError, DataError

ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
BUCKETS = BucketConfig(enabled=True, step=4)  # at SPEC's 12 px: 16x8, 12x12, 8x16 (min side 6 -> 8, max 24)


def _png(width: int, height: int, pixels: np.ndarray | None = None) -> bytes:
    img = Image.fromarray(pixels) if pixels is not None else Image.new("RGB", (width, height), (120, 30, 200))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """3 shards of synthetic scenes in 5 shapes (45 samples) plus one 4:1 panorama and one 6 px image."""
    root = tmp_path_factory.mktemp("mixed")
    samples = [make_sample(i, 0, "train", 16, "jpg", ASPECTS) for i in range(45)]
    samples.insert(7, ("x_wide", {"png": _png(48, 12), "txt": b"a panorama"}))
    samples.insert(30, ("x_tiny", {"jpg": jpeg_bytes(6, 6, 1), "txt": b"a thumbnail"}))
    for shard in range(3):
        write_tar(root / f"shard-{shard:06d}.tar", samples[shard * 16:(shard + 1) * 16])
    return root


@pytest.mark.parametrize("resolution, low, high, step", [(64, 32, 128, 16), (32, 16, 64, 8), (96, 48, 192, 32),
                                                          (12, 6, 24, 4)])
def test_generated_shapes(resolution, low, high, step):
    shapes = bucket_shapes(resolution, low, high, step)
    assert (resolution, resolution) in shapes and len(set(shapes)) == len(shapes)
    assert set(shapes) == {(w, h) for h, w in shapes}  # both orientations
    ratios = [w / h for h, w in shapes]
    assert ratios == sorted(ratios)
    for h, w in shapes:
        assert h % step == 0 and w % step == 0 and low <= min(h, w) and max(h, w) <= high
        assert h * w <= resolution ** 2
        # one side is the longest multiple of step that fits the area with the other (generated, then transposed)
        assert resolution ** 2 < (h + step) * w or resolution ** 2 < h * (w + step)


def test_shape_settings_and_errors():
    assert resolve_shapes(BucketConfig(True, ((32, 64), (16, 16), (64, 32))), 99) == ((64, 32), (16, 16), (32, 64))
    assert resolve_shapes(BucketConfig(True, step=4), 12) == ((16, 8), (12, 12), (8, 16))
    with pytest.raises(ConfigError, match="multiple of data.buckets.step=8"):
        resolve_shapes(BucketConfig(True), 12)
    with pytest.raises(ConfigError, match="step"):
        BucketConfig(True, step=0)


@pytest.mark.parametrize("width, height, expected", [(160, 90, (8, 16)), (90, 160, (16, 8)), (100, 110, (12, 12)),
                                                     (141, 100, (12, 12)), (142, 100, (8, 16))])
def test_nearest_aspect_in_log_space(width, height, expected):
    shapes = ((16, 8), (12, 12), (8, 16))
    assert shapes[nearest_bucket(width, height, shapes)] == expected  # sqrt(2) = 1.414 is the 1:1 / 2:1 border


def test_resize_to_cover_and_least_crop_along_the_long_side():
    """A 100 x 40 horizontal ramp into a 16 x 32 bucket: scale 0.4 (height 40 -> 16), 40 px wide -> 8 px of room,
    cropped only horizontally; the crop box is reported in the resized image's pixels."""
    ramp = np.tile(np.linspace(0, 250, 100)[None, :, None], (40, 1, 3)).astype(np.uint8)
    shapes = ((32, 16), (16, 16), (16, 32))
    data = _png(100, 40, ramp)
    out, crop = decode_with_crop(data, ImageOptions(16, False, buckets=shapes), 0)
    assert out.shape == (16, 32, 3) and crop.bucket == 2
    assert (crop.orig_height, crop.orig_width, crop.crop_top, crop.height, crop.width) == (40, 100, 0, 16, 32)
    assert crop.crop_left == 4  # centre of the 8 free pixels
    lefts = set()
    for seed in range(200):
        image, c = decode_with_crop(data, ImageOptions(16, True, buckets=shapes), seed * 0x9E3779B97F4A7C15 % 2**64)
        lefts.add(c.crop_left)
        # fp64 reference of what column 0 shows: the ramp at source x = (left + 0.5) / 0.4, pixel centres
        expected = 250 * ((c.crop_left + 0.5) / 0.4 - 0.5) / 99
        assert abs(float(image[8, 0, 0]) - expected) <= 4, (c.crop_left, image[8, 0, 0], expected)
        assert c.crop_top == 0
    assert lefts == set(range(9))  # every offset 0..8 of the long side, and nothing else


def test_every_size_decodes_into_every_bucket_set():
    """No valid image is refused: (offset + side) / scale can round past the image edge, which PIL would refuse
    (it was counted as corrupt_image before the box was clamped)."""
    for resolution, step in ((16, 8), (32, 8), (64, 16)):
        shapes = bucket_shapes(resolution, resolution // 2, resolution * 2, step)
        for width in range(resolution // 2, 3 * resolution, 3):
            for height in range(resolution // 2, 3 * resolution, 5):
                if max(width, height) / min(width, height) > 4:
                    continue
                data = _png(width, height)
                for random_crop in (False, True):
                    image, crop = decode_with_crop(data, ImageOptions(resolution, random_crop, buckets=shapes),
                                                   width * 7919 + height)
                    assert image.shape == (*shapes[crop.bucket], 3)


def _loader(urls, batch_size=4, rank=0, world_size=1, **cfg):
    cfg = {"buckets": BUCKETS, "crop": "random", **cfg}
    data = data_config(urls, **cfg)
    return build_train_loader(data, SPEC, batch_size=batch_size, seed=3, rank=rank, world_size=world_size)


def test_every_key_of_a_mixed_aspect_epoch_exactly_once(mixed_shards):
    """Batches hold one bucket each; what was handed out plus what waits in the buckets is exactly the stream's
    samples in order (the same loader without buckets, batch 1, same limits), so nothing is padded, dropped or
    repeated; a whole epoch (45 keys) is in it once. The panorama and the thumbnail are skipped by reason."""
    limits = {"min_image_size": 8, "max_aspect_ratio": 2.4}  # the bucketed loader's auto values, stated
    bucketed = _loader(mixed_shards)  # shard order shuffled; no sample buffer, so an epoch ends sharply
    batches = take(iter(bucketed), 14)  # 56 samples: more than an epoch
    bucketed.close()
    shapes = Counter()
    for batch in batches:
        _, _, h, w = batch["image"].shape
        shapes[(h, w)] += 1
        assert batch["target_size"].tolist() == [[h, w]] * 4
        orig = batch["orig_size"].double()
        assert all(abs(math.log((ow / oh) / (w / h))) < 0.5 for oh, ow in orig.tolist())
    assert set(shapes) == {(16, 8), (12, 12), (8, 16)}
    state = bucketed.state_dict()
    waiting = [key for bucket in state["workers"][0]["buckets"] for _, _, key in bucket]
    assert all(len(bucket) < 4 for bucket in state["workers"][0]["buckets"])
    handed = [k for b in batches for k in b["key"]]
    plain = _loader(mixed_shards, batch_size=1, buckets=BucketConfig(), **limits)
    order = [b["key"][0] for b in take(iter(plain), len(handed) + len(waiting))]
    plain.close()
    assert Counter(handed + waiting) == Counter(order)
    assert sorted(order[:45]) == sorted(f"train{i:08d}" for i in range(45))  # one epoch, each key once
    counts = bucketed.skip_counts()
    assert counts == plain.skip_counts() and set(counts) == {"bad_aspect_ratio", "image_too_small"}


@pytest.mark.parametrize("num_workers, consumed, following", [(0, 7, 6), (2, 5, 6)])
def test_resume_with_waiting_samples_is_bitwise(mixed_shards, num_workers, consumed, following):
    batches = check_resume(lambda: _loader(mixed_shards, num_workers=num_workers, shuffle_buffer=6),
                           consumed, following)
    assert len({tuple(b["image"].shape) for b in batches}) == 3


def test_resume_two_ranks(mixed_shards):
    for rank in (0, 1):
        check_resume(lambda: _loader(mixed_shards, rank=rank, world_size=2, num_workers=2, shuffle_buffer=4), 3, 5)


def test_changed_buckets_or_shards_refuse_to_resume(mixed_shards, tmp_path):
    loader = _loader(mixed_shards, shuffle_buffer=4)
    take(iter(loader), 3)
    state = loader.state_dict()
    loader.close()
    assert any(state["workers"][0]["buckets"])  # something is waiting
    with pytest.raises(DataError, match="saved with buckets"):
        _loader(mixed_shards, buckets=BucketConfig(True, ((12, 12),))).load_state_dict(state)
    with pytest.raises(DataError, match="saved with buckets"):
        _loader(mixed_shards, buckets=BucketConfig()).load_state_dict(state)
    for shard in sorted(mixed_shards.glob("*.tar")):
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    copy = _loader(tmp_path, shuffle_buffer=4)
    state_copy = {**state, "plan": copy.state_dict()["plan"]}
    for shard in tmp_path.glob("*.tar"):
        shard.write_bytes(b"\0" * 1024)
    copy.load_state_dict(state_copy)
    with pytest.raises(DataError, match="shards changed since the checkpoint"):
        next(iter(copy))


def test_eval_stays_square(mixed_shards):
    from pipeline.data.loader import build_eval_loader

    data = data_config((), eval_urls=str(mixed_shards), buckets=BUCKETS)
    batch = next(iter(build_eval_loader(data, SPEC, batch_size=4, max_samples=8, rank=0, world_size=1)))
    assert batch["image"].shape == (4, 3, 12, 12) and "orig_size" not in batch


def test_loss_masks_come_with_bucketed_batches_cropped_like_their_images(tmp_path):
    """A bucketed batch carries each sample's loss mask (KEY.mask.png) at its bucket's shape, 255 everywhere for a
    sample without one. The sources have their bucket's exact shape (resize and crop are the identity), so a mask
    that is the image's red channel must come out equal to the delivered image's red channel."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(16):
        width, height = (16, 8) if i % 2 else (8, 16)
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        members = {"png": _png(width, height, image), "txt": f"caption {i}".encode()}
        if i % 4 < 2:
            members["mask.png"] = _png(width, height, image[..., 0].copy())
        samples.append((f"s{i:05d}", members))
    url = write_tar(tmp_path / "masks.tar", samples)
    data = data_config(url, buckets=BUCKETS, crop="center")
    spec = SampleSpec(image_size=12, tokenize=toy_tokenize, loss_mask=True)
    loader = build_train_loader(data, spec, batch_size=4, seed=3, rank=0, world_size=1)
    shapes = set()
    for batch in take(iter(loader), 4):
        images, masks = batch["image"], batch["loss_mask"]
        shapes.add(tuple(images.shape[-2:]))
        assert masks.dtype == torch.uint8 and masks.shape == (images.shape[0], 1, *images.shape[-2:])
        for i, key in enumerate(batch["key"]):
            if int(key[1:]) % 4 < 2:
                np.testing.assert_array_equal(masks[i, 0].numpy(), images[i, 0].numpy())
            else:
                assert (masks[i, 0] == 255).all()
    assert shapes == {(8, 16), (16, 8)}
