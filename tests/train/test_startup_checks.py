"""Every path a run reads is checked before the first step (and before any model is built), on every rank, with
one clear line: shard specs (train, eval, precomputed), ckpt.init_from and the files a stage's model config names."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from train_helpers import base_config, train_inprocess, train_subprocess, write_config


def _clip_model() -> dict:
    return {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
            "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 1}}


CASES = {
    "data.eval_urls": lambda shards, missing: {"data": {"eval_urls": missing}, "eval": {"every_steps": 100}},
    "data.precomputed_urls": lambda shards, missing: {"data": {"precomputed_urls": missing}},
    "data.eval_precomputed_urls": lambda shards, missing: {"data": {"eval_precomputed_urls": missing}},
    "ckpt.init_from": lambda shards, missing: {"ckpt": {"every_steps": 3, "keep_last": 0, "init_from": missing}},
    "model.pretrained": lambda shards, missing: {"stage": "clip", "model": {**_clip_model(), "pretrained": missing}},
}


@pytest.mark.parametrize("key", sorted(CASES))
def test_a_missing_path_fails_before_training_naming_its_key(key, shards, tmp_path):
    missing = str(tmp_path / "not-there" / "shard-{000000..000003}.tar")
    raw = base_config(shards, train={"max_steps": 100})
    for section, values in CASES[key](shards, missing).items():
        raw[section] = {**raw[section], **values} if section in ("data", "ckpt", "eval") else values
    with pytest.raises(PipelineError) as info:
        train_inprocess(raw, tmp_path / "run")
    message = str(info.value)
    assert key in message and "not-there" in message and "\n" not in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_every_rank_reports_a_missing_eval_path(shards, tmp_path):
    raw = base_config(shards, data={"eval_urls": str(tmp_path / "heldout-typo")}, eval={"every_steps": 3})
    config = write_config(tmp_path / "run.yaml", raw)
    done = train_subprocess(config, tmp_path / "run", 2, timeout=180)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: data.eval_urls")]
    assert len(lines) == 2 and all("heldout-typo" in line for line in lines), done.stderr[-3000:]
    assert not Path(tmp_path / "run" / "metrics.jsonl").exists()
