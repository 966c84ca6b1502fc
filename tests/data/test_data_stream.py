"""The streaming reader: batch layout, transforms, shard specs, epochs, rank/worker splits, eval passes."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import ALL_RECT_KEYS, SPEC, TOKEN_LEN, data_config, good_sample, take, toy_tokenize, write_tar
from pipeline.data.loader import STATE_KEY, build_eval_loader, build_train_loader
from pipeline.data.sources import ShardPlan, expand_shard_specs, mix
from pipeline.data.spec import SampleSpec, normalize_batch, normalize_images
from pipeline.data.synthetic import make_sample, write_synthetic_shards
from pipeline.data.transforms import ImageOptions, decode_image


def _train(urls, *, batch_size=4, seed=0, rank=0, world_size=1, spec=SPEC, **cfg):
    return build_train_loader(data_config(urls, **cfg), spec, batch_size=batch_size, seed=seed, rank=rank,
                              world_size=world_size)


def test_batch_layout_matches_the_spec(rect_shards):
    batch = next(iter(_train(rect_shards, batch_size=5, shuffle_buffer=8)))
    assert set(batch) == {"image", "caption", "key", "text"}
    assert batch["image"].shape == (5, 3, 12, 12) and batch["image"].dtype == torch.uint8  # not normalised
    assert batch["image"].is_contiguous() and batch["image"].max() > 100  # the JPEG colours are 0..255
    assert batch["text"].shape == (5, TOKEN_LEN) and batch["text"].dtype == torch.int64
    assert len(batch["caption"]) == len(batch["key"]) == 5
    assert all(c == f"caption {int(k[1:])}" for c, k in zip(batch["caption"], batch["key"]))
    assert torch.equal(batch["text"], toy_tokenize(batch["caption"])["text"])


def test_no_image_spec_gives_captions_only(rect_shards):
    batch = next(iter(_train(rect_shards, spec=SampleSpec(image_size=0))))
    assert set(batch) == {"caption", "key"}


def test_center_crop_and_normalisation_are_exact(tmp_path):
    write_synthetic_shards(tmp_path, 6, 6, 16, seed=3, image_format="png")  # lossless, already 16 x 16
    spec = SampleSpec(image_size=16, image_mean=(0.2, 0.4, 0.6), image_std=(0.5, 0.25, 2.0))
    data = data_config((), eval_urls=str(tmp_path))
    batch = next(iter(build_eval_loader(data, spec, batch_size=6, max_samples=6, rank=0, world_size=1)))
    images = normalize_images(batch["image"], spec, torch.device("cpu"), torch.float32)
    for i, key in enumerate(batch["key"]):
        _, members = make_sample(int(key[5:]), 3, "train", 16, "png")
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(members["png"])).convert("RGB")))
        assert torch.equal(batch["image"][i], pixels.permute(2, 0, 1))  # eval batches are uint8 too
        expected = (pixels.permute(2, 0, 1).float() / 255 - torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1)) \
            / torch.tensor([0.5, 0.25, 2.0]).view(3, 1, 1)
        assert torch.allclose(images[i], expected, atol=1e-6)


def _former_float_path(images: list[np.ndarray], mean, std) -> torch.Tensor:
    """The reader's float32 normalisation before batches became uint8 (numpy cast, multiply, subtract)."""
    std_arr = np.asarray(std, np.float32).reshape(3, 1, 1)
    scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
    shift = (np.asarray(mean, np.float32).reshape(3, 1, 1) / std_arr).astype(np.float32)
    out = np.empty((len(images), 3, *images[0].shape[:2]), np.float32)
    for i, image in enumerate(images):
        out[i] = image.transpose(2, 0, 1)
        out[i] *= scale
        out[i] -= shift
    return torch.from_numpy(out)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_normalize_images_of_loader_output_equals_the_former_float_batches(rect_shards, num_workers):
    spec = SampleSpec(image_size=12, image_mean=(0.48145466, 0.4578275, 0.40821073),
                      image_std=(0.26862954, 0.26130258, 0.27577711))  # open_clip's OpenAI constants
    loader = _train(rect_shards, batch_size=5, spec=spec, num_workers=num_workers, shuffle_buffer=8)
    for batch in take(iter(loader), 3):
        images = batch["image"]
        expected = _former_float_path([im.permute(1, 2, 0).numpy() for im in images], spec.image_mean,
                                      spec.image_std)
        got = normalize_images(images, spec, torch.device("cpu"), torch.float32)
        assert got.dtype == torch.float32 and got.shape == images.shape
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)
        reference64 = (images.double() / 255 - torch.tensor(spec.image_mean).double().view(1, 3, 1, 1)) \
            / torch.tensor(spec.image_std).double().view(1, 3, 1, 1)
        assert torch.allclose(got.double(), reference64, atol=1e-6, rtol=0)
        half = normalize_images(images, spec, "cpu", torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, got.to(torch.bfloat16))  # fp32 math, then cast
        normed = normalize_batch(batch, spec, "cpu", torch.float32)
        assert torch.equal(normed["image"], got) and normed["key"] == batch["key"]
        assert batch["image"].dtype == torch.uint8  # the loader's batch is not modified
    loader.close()


def test_normalize_images_refuses_float_input():
    spec = SampleSpec(image_size=4)
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(torch.zeros(1, 3, 4, 4), spec, "cpu", torch.float32)
    assert normalize_batch({"caption": ["x"], "key": ["k"]}, spec, "cpu", torch.float32) == \
        {"caption": ["x"], "key": ["k"]}


def test_crops_cover_the_long_side_and_vary_with_the_seed():
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (16, 1, 3))).save(buf, "PNG")
    data = buf.getvalue()  # 64 x 16, a horizontal ramp
    center = decode_image(data, ImageOptions(16, random_crop=False), 0)
    assert center.shape == (16, 16, 3) and abs(int(center[:, 0, 0].mean()) - 24 * 4) <= 4
    lefts = {int(decode_image(data, ImageOptions(16, True), mix(seed))[0, 0, 0]) for seed in range(60)}
    assert len(lefts) > 10 and min(lefts) <= 8 and max(lefts) >= 180  # offsets span the whole 0..48 range


def test_downscaled_jpeg_uses_draft_and_keeps_content():
    img = Image.new("RGB", (256, 192), (200, 30, 40))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    out = decode_image(buf.getvalue(), ImageOptions(32, random_crop=False), 0)
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - [200, 30, 40]).max() <= 6


def test_shard_specs_directory_brace_list_and_pipe(rect_shards):
    shards = sorted(str(p) for p in rect_shards.glob("*.tar"))
    assert expand_shard_specs(str(rect_shards)) == shards
    assert expand_shard_specs(f"{rect_shards}/shard-{{000001..000003}}.tar") == shards[1:4]
    assert expand_shard_specs((shards[4], str(rect_shards))) == shards[4:] + shards
    assert expand_shard_specs(f"pipe:cat {rect_shards}/shard-{{000000..000001}}.tar") == \
        [f"pipe:cat {s}" for s in shards[:2]]
    piped = _train(tuple(f"pipe:cat {s}" for s in shards), batch_size=10)
    assert {k for b in take(iter(piped), 5) for k in b["key"]} == ALL_RECT_KEYS


def test_one_epoch_is_every_sample_once_then_a_new_order(rect_shards):
    loader = _train(rect_shards, batch_size=5, shuffle_buffer=0)
    keys = [k for b in take(iter(loader), 20) for k in b["key"]]
    assert set(keys[:50]) == set(keys[50:]) == ALL_RECT_KEYS
    assert keys[:50] != keys[50:]  # the shard order is reshuffled per epoch
    other_seed = [k for b in take(iter(_train(rect_shards, batch_size=5, seed=1)), 10) for k in b["key"]]
    assert other_seed != keys[:50]
    fixed = [k for b in take(iter(_train(rect_shards, batch_size=5, shuffle_shards=False)), 10) for k in b["key"]]
    assert fixed == sorted(ALL_RECT_KEYS)


def test_shuffle_buffer_mixes_samples_within_and_across_shards(rect_shards):
    keys = [k for b in take(iter(_train(rect_shards, batch_size=10, shuffle_buffer=20)), 5) for k in b["key"]]
    shards_in_first_batch = {int(k[1:]) // 10 for k in keys[:10]}
    assert len(shards_in_first_batch) >= 2 and keys[:10] != sorted(keys[:10])
    assert len(set(keys)) >= 40  # a buffer only delays samples, it does not repeat them


def test_fewer_shards_than_streams_split_by_sample_index(tmp_path):
    write_tar(tmp_path / "only.tar", (good_sample(i) for i in range(12)))
    plan = ShardPlan((str(tmp_path / "only.tar"),), num_streams=4, seed=0)
    assert plan.parts == 4 and {plan.unit(g, 0).part for g in range(4)} == {0, 1, 2, 3}
    seen = []
    for rank in range(4):  # 4 ranks x 1 stream, 1 shard: each rank gets every 4th sample, disjoint
        loader = _train(str(tmp_path), batch_size=3, rank=rank, world_size=4)
        seen.append({k for k in next(iter(loader))["key"]})
    assert all(len(s) == 3 for s in seen) and len(set().union(*seen)) == 12


def test_plan_units_are_disjoint_within_an_epoch_and_balanced():
    plan = ShardPlan(tuple(f"s{i}.tar" for i in range(7)), num_streams=3, seed=5)
    reads = [(plan.unit(g, k).url, plan.unit(g, k).epoch) for k in range(7) for g in range(3)]
    for epoch in range(3):
        urls = [u for u, e in reads if e == epoch]
        assert len(urls) == len(set(urls)) == 7
    resampled = ShardPlan(plan.urls, num_streams=3, seed=5, resampled=True)
    draws = [resampled.unit(0, k).url for k in range(50)]
    assert len(set(draws)) == 7 and len(draws) > len(set(draws))


def test_resampled_stream_runs_forever(rect_shards):
    loader = _train(rect_shards, batch_size=10, resampled=True, shuffle_buffer=10)
    keys = [k for b in take(iter(loader), 12) for k in b["key"]]
    assert len(keys) == 120 and set(keys) <= ALL_RECT_KEYS


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_is_deterministic_split_over_ranks_and_capped(rect_shards, num_workers):
    data = data_config((), eval_urls=str(rect_shards), num_workers=num_workers, crop="random")
    per_rank = []
    for rank in (0, 1):
        loader = build_eval_loader(data, SPEC, batch_size=4, max_samples=21, rank=rank, world_size=2)
        first, second = list(loader), list(loader)
        assert all(STATE_KEY not in b for b in first)
        assert [b["key"] for b in first] == [b["key"] for b in second]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))
        assert [len(b["key"]) for b in first][:-1] == [4] * (len(first) - 1)
        per_rank.append([k for b in first for k in b["key"]])
    assert per_rank[0] == [f"s{i:05d}" for i in range(0, 21, 2)]
    assert per_rank[1] == [f"s{i:05d}" for i in range(1, 21, 2)]


def test_eval_with_workers_equals_eval_without(rect_shards):
    batches = {}
    for workers in (0, 2):
        data = data_config((), eval_urls=str(rect_shards), num_workers=workers)
        batches[workers] = list(build_eval_loader(data, SPEC, batch_size=6, max_samples=50, rank=0, world_size=1))
    assert [b["key"] for b in batches[0]] == [b["key"] for b in batches[2]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches[0], batches[2]))
