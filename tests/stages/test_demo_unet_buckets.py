"""configs/demo/unet_buckets.yaml trains on `shards synthetic --aspect-ratios` output with only data.urls set: the
base U-Net gets non-square micro-batches of one bucket each."""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.data.loader import build_train_loader
from pipeline.data.spec import SampleSpec
from train_helpers import read_metrics, train_inprocess

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "unet_buckets.yaml"


def test_bucketed_demo_config_trains_on_mixed_aspect_shards(tmp_path):
    shards = tmp_path / "mixed"
    assert main(["shards", "synthetic", "--out", str(shards), "--num-samples", "120", "--shard-size", "60",
                 "--resolution", "16", "--aspect-ratios", "1:1,4:3,3:4,16:9,9:16"]) == 0
    raw = yaml.safe_load(CONFIG.read_text())
    raw["data"]["urls"] = str(shards)  # the one setting the config needs; the rest is shrunk for a CPU test
    raw["data"]["num_workers"] = 0
    raw["train"].update(max_steps=3, micro_batch_size=4, log_every=1, sample_every=0)
    raw["ckpt"]["every_steps"] = 3
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    loader = build_train_loader(cfg.data, SampleSpec(image_size=16),
                                batch_size=4, seed=0, rank=0, world_size=1)
    shapes = {tuple(b["image"].shape[2:]) for b, _ in zip(loader, range(12))}
    loader.close()
    assert len(shapes) >= 3 and any(h != w for h, w in shapes)
    assert train_inprocess(raw, tmp_path / "run") == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
