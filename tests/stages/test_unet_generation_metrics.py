"""eval/fid, eval/kid and eval/clip_score of a `unet` stage's evaluation (eval.num_images): off unless configured,
each image seeded by its held-out sample so the numbers do not depend on how samples are split into batches or
ranks; 2 gloo ranks through the Trainer report what 1 rank reports."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.stages.unet import UNetStage
from pipeline.text.t5 import T5Tokenize
from pipeline.train.stage import StageContext
from eval_helpers import save_random_inception
from prior_helpers import export_tiny_clip
from train_helpers import read_metrics, train_subprocess, write_config
from unet_helpers import unet_config

METRICS = ("fid", "kid", "kid_std", "clip_score", "guidance", "generation_seconds", "images")

# A random tiny CLIP whose image and caption embeddings have positive cosines on noise-like images (seeds 0 and 1
# give only negative ones, which CLIP score clips to 0 and would make its comparisons prove nothing).
CLIP_SEED = 3


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    return save_random_inception(root / "inception.pth"), export_tiny_clip(root / "clip", seed=CLIP_SEED)


def _eval_section(helpers, num_images: int) -> dict:
    weights, clip = helpers
    return {"num_images": num_images, "inception_weights": str(weights), "clip": str(clip), "guidance": 2.0,
            "kid_subsets": 3}


def test_figures_do_not_depend_on_how_samples_are_batched_and_are_off_by_default(shards, helpers):
    cfg = load_config(None, base=unet_config(shards, model={"eval_prompts": 0},
                                             eval={**_eval_section(helpers, 2), "max_samples": 8}))
    stage = UNetStage(cfg, StageContext(rank=0, world_size=1, device=torch.device("cpu"),
                                        compute_dtype=torch.float32))
    models, frozen = stage.build_trainable(), stage.build_frozen()
    captions = ["a large red circle on the left", "a small blue square at the top"]
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    batch = {"image": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, "caption": captions, "key": ["a", "b"],
             **T5Tokenize("tiny", 16)(captions)}
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in (0, 1)]
    with torch.no_grad():
        whole, split = stage.evaluate(models, frozen, [batch]), stage.evaluate(models, frozen, halves)
    assert set(METRICS) <= set(whole)
    assert whole["images"] == (2.0, 1.0) and whole["guidance"] == (2.0, 1.0)
    for key in ("fid", "kid", "clip_score"):
        assert whole[key][0] == pytest.approx(split[key][0], rel=1e-4, abs=1e-9), key
    # Informative numbers, so that the equality above could fail: features that differ, scores that are not 0.
    assert whole["fid"][0] > 0.1 and 0 < whole["clip_score"][0] <= 100, whole

    off = UNetStage(load_config(None, base=unet_config(shards, model={"eval_prompts": 0})), stage.ctx)
    with torch.no_grad():
        assert not set(METRICS) & set(off.evaluate(models, frozen, [batch]))


def test_configured_without_anything_to_measure_is_one_line(shards):
    with pytest.raises(ConfigError, match="nothing to measure"):
        load_config(None, base=unet_config(shards, eval={"num_images": 4}))
    with pytest.raises(ConfigError, match="eval.max_samples"):
        load_config(None, base=unet_config(shards, eval={"num_images": 16, "max_samples": 8, "clip": "x"}))


@pytest.mark.slow
def test_two_ranks_report_the_figures_of_one(shards, helpers, tmp_path):
    # lr 1e-12: Adam moves no fp32 weight, so both runs evaluate the same (initial) network at their last step.
    raw = unet_config(shards, model={"eval_prompts": 0}, optim={"lr": 1e-12},
                      train={"max_steps": 1, "sample_every": 0, "ema_decay": 0.0},
                      eval={**_eval_section(helpers, 4), "every_steps": 1, "max_samples": 8, "batch_size": 2},
                      dist={"timeout_s": 120}, ckpt={"every_steps": 1})
    config = write_config(tmp_path / "q.yaml", raw)
    found = []
    for nproc in (1, 2):
        done = train_subprocess(config, tmp_path / f"run{nproc}", nproc, timeout=400)
        assert done.returncode == 0, done.stderr[-5000:]
        found.append([r for r in read_metrics(tmp_path / f"run{nproc}") if "eval/fid" in r][-1])
    one, two = found
    assert one["eval/images"] == two["eval/images"] == 4
    assert one["eval/fid"] > 0.1 and one["eval/kid"] != 0 and one["eval/clip_score"] > 0, one
    for key in ("eval/fid", "eval/kid", "eval/clip_score"):
        assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-9), key
