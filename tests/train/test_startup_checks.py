"""Every path a run reads is checked before the first step (and before any model is built), on every rank, with
one clear line: shard specs (train, eval, precomputed), ckpt.init_from and the files a stage's model config names."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from train_helpers import base_config, train_inprocess, write_config


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
    import subprocess

    from train_helpers import REPO, TORCHRUN, subprocess_env

    raw = base_config(shards, data={"eval_urls": str(tmp_path / "heldout-typo")}, eval={"every_steps": 3})
    config = write_config(tmp_path / "run.yaml", raw)
    logs = tmp_path / "logs"
    # Each rank's stderr to its own file: on one shared pipe two ranks' lines may interleave mid-line.
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "2",
               "-m", "pipeline", "train", str(config), "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    errors = sorted(logs.rglob("stderr.log"))
    assert len(errors) == 2, done.stderr[-3000:]
    for path in errors:
        last = path.read_text().strip().splitlines()[-1]
        assert last.startswith("error: data.eval_urls") and "heldout-typo" in last, path.read_text()[-2000:]
    assert not Path(tmp_path / "run" / "metrics.jsonl").exists()
