"""``shards precompute --encoder latents:AE_DIR --buckets-config RUN.yaml``: latents per aspect-ratio bucket, each
image placed and centre-cropped by the training loader's own options, so that the cached latents equal the latents
the training loader's live encoder path computes; a bucketed latent stage trains on them, the loader resumes them
exactly, and mismatched settings are refused at start-up with one line."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from ae_helpers import export_tiny_autoencoder
from data_helpers import check_resume, jpeg_bytes, take, write_tar
from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.data.loader import build_train_loader
from pipeline.data.precomputed_index import CROP_ARRAY
from pipeline.data.spec import SampleSpec, normalize_images
from pipeline.data.synthetic import make_sample, write_synthetic_shards
from pipeline.errors import ConfigError, DataError
from pipeline.stages.autoencoder import load_codec
from pipeline.stages.unet import UNetStage
from pipeline.train.stage import StageContext
from precompute_helpers import stored_arrays
from train_helpers import read_metrics, train_inprocess, write_config
from unet_helpers import unet_config

ASPECTS = ((1, 1), (4, 3), (3, 1), (1, 3), (4, 1), (1, 4))
LATENT_UNET = {"channels": 16, "channel_mult": [1, 2], "attention_resolutions": [2], "head_width": 8, "norm_groups": 8}
# At 16 px, step 8: 32x8, 24x8, 16x16, 8x24, 8x32 (height x width), the image shapes the latents are made at.
BUCKETS = {"enabled": True, "step": 8}
SHAPES = {(32, 8), (24, 8), (16, 16), (8, 24), (8, 32)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Mixed-aspect shards (train 2 x 18, heldout 8 square), a tiny autoencoder, the run config, and the precompute
    of train per bucket (--buckets-config) and of heldout as squares (evaluation stays square)."""
    root = tmp_path_factory.mktemp("latent_buckets")
    write_synthetic_shards(root / "shards" / "train", 36, 18, 16, 0, "train", "png", ASPECTS)
    write_synthetic_shards(root / "shards" / "heldout", 8, 8, 16, 1, "heldout", "png")
    export_tiny_autoencoder(root / "ae")
    raw = run_config(root, root / "ae")
    config = write_config(root / "run.yaml", raw)
    assert main(["shards", "precompute", str(root / "shards" / "train"), "--out", str(root / "pre"),
                 "--batch-size", "7", "--encoder", f"latents:{root / 'ae'}", "--buckets-config", str(config)]) == 0
    assert main(["shards", "precompute", str(root / "shards" / "heldout"), "--out", str(root / "pre_eval"),
                 "--encoder", f"latents:{root / 'ae'}"]) == 0
    return root, raw


def run_config(root, autoencoder, **data):
    model = {"space": "latent", "autoencoder": str(autoencoder), "unet": LATENT_UNET, "latent_source": "precomputed",
             "micro_conditioning": {"enabled": True, "embed_dim": 8}}
    raw = unet_config(root / "shards", model=model,
                      data={"buckets": BUCKETS, "crop": "center", "precomputed_urls": str(root / "pre"),
                            "eval_precomputed_urls": str(root / "pre_eval"), "shuffle_buffer": 4, **data},
                      train={"max_steps": 3, "sample_every": 0}, eval={"every_steps": 3, "max_samples": 8})
    return raw


def _loader(raw, spec, num_workers=0, batch_size=3):
    """The training loader of run config `raw` (its train.seed) with `num_workers` workers."""
    cfg = load_config(None, base=raw)
    data = type(cfg.data)(**{**cfg.data.__dict__, "num_workers": num_workers})
    return build_train_loader(data, spec, batch_size=batch_size, seed=cfg.train.seed, rank=0, world_size=1)


def test_index_records_bucket_shapes(setup):
    root, _ = setup
    index = json.loads((root / "pre" / "shards.json").read_text())
    latent = index["arrays"]["latent"]
    assert latent["shape"] == [4, None, None] and {tuple(b) for b in latent["buckets"]} == SHAPES
    assert index["arrays"][CROP_ARRAY]["dtype"] == "int64" and index["arrays"][CROP_ARRAY]["shape"] == [6]
    stored = stored_arrays(root / "pre")
    assert len(stored) == 36
    seen = Counter()
    for arrays in stored.values():
        _, _, _, _, height, width = arrays[CROP_ARRAY].tolist()
        assert arrays["latent"].shape == (4, height // 4, width // 4)  # f = 4
        seen[(height, width)] += 1
    assert set(seen) == SHAPES  # every bucket got images


def test_cached_latents_equal_the_live_encoder_path(setup):
    """The training loader with latent_source encoder (images only, buckets, centre crops) vs. the same loader
    reading the precomputed latents: same keys, same buckets, same size conditioning, and per sample the stored
    latent is the live fp32 latent rounded to fp16: |cached - live| <= |live| * 2^-11 (fp16 round-to-nearest,
    unit roundoff) + 1e-5 (fp32 conv results may differ in the last bits between batch compositions)."""
    root, raw = setup
    codec = load_codec(root / "ae")
    live_spec = SampleSpec(image_size=16)
    cached_spec = SampleSpec(image_size=16, precomputed=("latent",), per_bucket=("latent",))
    live_raw = {**raw, "data": {**raw["data"], "precomputed_urls": ""}}
    live = take(iter(_loader(live_raw, live_spec)), 8)
    cached = take(iter(_loader(raw, cached_spec)), 8)
    shapes = set()
    for a, b in zip(live, cached):
        assert a["key"] == b["key"]
        for name in ("image", "orig_size", "crop_top_left", "target_size"):
            assert torch.equal(a[name], b[name]), name
        with torch.no_grad():
            want = codec.encode(normalize_images(a["image"], live_spec, "cpu", torch.float32))
        got = b["latent"]
        assert got.dtype == torch.float16 and got.shape == want.shape
        bound = want.abs() * 2.0 ** -11 + 1e-5
        assert ((got.float() - want).abs() <= bound).all()
        shapes.add(tuple(got.shape[-2:]))
    assert len(shapes) >= 3  # batches of several bucket shapes


@pytest.mark.parametrize("num_workers", [0, 2])  # in-process, < 1 s: not marked slow
def test_resume_on_precomputed_bucketed_latents_is_bitwise(setup, num_workers):
    _, raw = setup
    spec = SampleSpec(image_size=16, precomputed=("latent",), per_bucket=("latent",))
    batches = check_resume(lambda: _loader(raw, spec, num_workers), 4, 5)
    assert len({tuple(b["latent"].shape) for b in batches}) >= 3


def test_bucketed_latent_stage_trains_on_precomputed_latents(setup, tmp_path):
    root, raw = setup
    assert train_inprocess(raw, tmp_path / "run") == 0
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert np.isfinite(metrics[-1]["eval/loss"])  # evaluation on the square precomputed heldout latents
    stage = UNetStage(load_config(None, base=raw), StageContext(0, 1, torch.device("cpu"), torch.float32))
    spec = stage.sample_spec()
    assert spec.per_bucket == ("latent",) and not spec.decode_image
    batches = take(iter(_loader(raw, spec, batch_size=4)), 3)  # the run's first 3 micro-batches
    assert len({tuple(b["latent"].shape) for b in batches}) >= 2
    # no image decoded: the same batches as the loader that decodes images and checks their crop
    decoded = take(iter(_loader(raw, SampleSpec(16, precomputed=spec.precomputed, tokenize=spec.tokenize,
                                                per_bucket=("latent",)), batch_size=4)), 3)
    for a, b in zip(batches, decoded):
        assert "image" not in a and "image" in b
        for name in ("key", "latent", "orig_size", "crop_top_left", "target_size", "t5_ids"):
            assert (torch.equal(a[name], b[name]) if isinstance(a[name], torch.Tensor) else a[name] == b[name]), name


def test_samples_the_precompute_skipped_count_under_its_reason(setup, tmp_path):
    """Without decoding the image, a corrupt or too small image is still counted by the reader's reason (the one
    the precompute recorded in KEY.skip), exactly as the loader that decodes it counts it."""
    root, raw = setup
    samples = [make_sample(i, 0, "train", 16, "png", ASPECTS) for i in range(10)]
    samples.insert(3, ("bad", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a red circle"}))
    samples.insert(7, ("tiny", {"jpg": jpeg_bytes(6, 6, 1), "txt": b"a blue square"}))
    write_tar((tmp_path / "src").mkdir() or tmp_path / "src" / "shard-000000.tar", samples)
    assert main(["shards", "precompute", str(tmp_path / "src"), "--out", str(tmp_path / "pre"), "--encoder",
                 f"latents:{root / 'ae'}", "--buckets-config", str(root / "run.yaml")]) == 0
    raw = {**raw, "data": {**raw["data"], "urls": str(tmp_path / "src"), "precomputed_urls": str(tmp_path / "pre"),
                           "shuffle_buffer": 0}}
    counts, keys = [], []
    for decode in (False, True):
        spec = SampleSpec(16, precomputed=("latent",), per_bucket=("latent",), decode_image=decode)
        loader = _loader(raw, spec, batch_size=1)
        keys.append([b["key"][0] for b in take(iter(loader), 10)])
        counts.append(loader.skip_counts())
        loader.close()
    assert keys[0] == keys[1] and counts[0] == counts[1] == {"corrupt_image": 1, "image_too_small": 1}


def _refused(error: type, pattern: str, fn, *args) -> None:
    with pytest.raises(error, match=pattern) as caught:
        fn(*args)
    assert "\n" not in str(caught.value)  # one line


def test_mismatched_settings_are_refused_with_one_line(setup, capsys):
    root, raw = setup
    spec = SampleSpec(image_size=16, precomputed=("latent",), per_bucket=("latent",))

    def data(**changes):
        return {**raw, "data": {**raw["data"], **changes}}
    other = {"enabled": True, "shapes": [[16, 16], [8, 32], [32, 8]]}
    _refused(DataError, r"were made for buckets .* this run has 32x8, 16x16, 8x32; re-run", _loader,
             data(buckets=other), spec)
    _refused(DataError, "centre squares but data.buckets is on", _loader,
             data(precomputed_urls=str(root / "pre_eval"), urls=str(root / "shards" / "heldout")), spec)
    _refused(DataError, "computed per aspect-ratio bucket, but this loader makes squares", _loader,
             data(buckets={"enabled": False}), spec)
    _refused(ConfigError, "data.crop random: precomputed per-bucket 'latent'", _loader, data(crop="random"), spec)
    ctx = StageContext(0, 1, torch.device("cpu"), torch.float32)
    _refused(ConfigError, "data.crop random: precomputed bucketed latents hold one", UNetStage,
             load_config(None, base=data(crop="random")), ctx)
    square = write_config(root / "square.yaml", data(buckets={"enabled": False}))
    assert main(["shards", "precompute", str(root / "shards" / "heldout"), "--out", str(root / "x"),
                 "--encoder", f"latents:{root / 'ae'}", "--buckets-config", str(square)]) == 2
    assert "data.buckets.enabled is false" in capsys.readouterr().err
    assert main(["shards", "precompute", str(root / "shards" / "heldout"), "--out", str(root / "y"),
                 "--encoder", f"latents:{root / 'ae'}:32", "--buckets-config", str(root / "run.yaml")]) == 2
    assert "with --buckets-config the image size is that config's data.resolution (16)" in capsys.readouterr().err
