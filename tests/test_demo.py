"""The demo's code path (shards -> CLIP through the Trainer -> export -> open_clip reload -> figures), smoke-sized.

The full demo (`make demo`) trains longer on more data; this guards the wiring, not the figures.
"""
from __future__ import annotations

import json

import pytest

from pipeline.demo import DemoSize, run_demo

SMOKE = DemoSize(train_samples=256, heldout_samples=64,
                 clip_overrides=("train.max_steps=6", "train.micro_batch_size=16", "eval.every_steps=3",
                                 "eval.max_samples=64", "eval.batch_size=16", "ckpt.every_steps=3",
                                 "data.num_workers=0", "log.progress_bar=false", "log.tensorboard=false"))


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_figures(tmp_path, capsys):
    import train_helpers

    train_helpers.ensure_process_group()  # in-process runs share one world-1 process group
    assert run_demo(tmp_path, SMOKE) == 0
    out = capsys.readouterr().out
    for text in ("held-out retrieval", "t2i_recall@1", "zero-shot attributes", "colour", "not in this version yet"):
        assert text in out
    bundle = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert bundle["components"]["clip"]["step"] == 6
    assert (tmp_path / "bundle" / "clip" / "open_clip_model.safetensors").is_file()
    # Re-running reuses the shards and resumes the finished run at its last step: nothing is retrained.
    shard_times = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*.tar")}
    assert run_demo(tmp_path, SMOKE) == 0
    assert "t2i_recall@1" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*.tar")} == shard_times
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/clip/metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and len(steps) == len(set(steps))
