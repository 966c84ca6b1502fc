"""Single-process training in this process: outputs, checkpoints, resume policies, corruption, export."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.errors import CheckpointError
from pipeline import manifest
from train_helpers import (assert_same_weights, base_config, latest_name, read_metrics, train_inprocess, weights)
from trainer_toy_stage import Regressor

REQUIRED = {"step", "loss", "lr", "samples_per_sec", "data_wait_frac", "skipped", "max_memory_bytes"}


def finished_config(shards: Path) -> dict:
    return base_config(shards, train={"ema_decay": 0.9, "sample_every": 3}, eval={"every_steps": 3},
                       ckpt={"every_steps": 2, "keep_last": 2}, log={"tensorboard": True, "progress_bar": True})


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A complete 6-step run (EMA, eval, samples, TensorBoard, checkpoints at 2/4/6, keep_last 2)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert train_inprocess(finished_config(shards), run_dir) == 0
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_run_writes_metrics_config_samples_and_checkpoints(finished, shards):
    records = read_metrics(finished)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert REQUIRED <= r.keys(), REQUIRED - r.keys()
        assert 0.0 <= r["data_wait_frac"] <= 1.0 and r["samples_per_sec"] > 0 and r["max_memory_bytes"] > 0
        assert r["skipped"]["nonfinite_steps"] == 0 and "mse" in r
    assert {r["step"] for r in records if "eval/mse" in r} == {3, 6}
    assert records[-1]["loss"] < records[0]["loss"]
    assert load_config(finished / "config.yaml") == load_config(finished.parent / "run.yaml")
    assert sorted(p.name for p in (finished / "samples").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    assert list((finished / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = finished / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000006"]  # keep_last 2
    assert latest_name(finished) == "step_00000006"
    for ckpt in ("step_00000004", "step_00000006"):
        manifest.verify_checkpoint(ckpts / ckpt)
        assert (ckpts / ckpt / "ema_model.safetensors").is_file()


def test_export_bundle_loads_strictly_and_merges(finished, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"format_version": 2, "components": {"clip": {"kind": "clip"}}}))
    assert main(["export", str(finished), "--out", str(bundle)]) == 0
    index = json.loads((bundle / "bundle.json").read_text())
    assert set(index["components"]) == {"clip", "toy"} and index["components"]["toy"]["ema"] is True
    model = Regressor(8)
    model.load_state_dict(load_file(str(bundle / "toy" / "model.safetensors")), strict=True)
    ema = weights(finished, use_ema=True)["model"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    raw = tmp_path / "raw"
    assert main(["export", str(finished), "--out", str(raw), "--no-ema", "--checkpoint", "step_00000004"]) == 0
    raw_state = load_file(str(raw / "toy" / "model.safetensors"))
    assert torch.equal(raw_state["conv.weight"], weights(finished, "step_00000004")["model"]["conv.weight"])
    assert not torch.equal(raw_state["conv.weight"], ema["conv.weight"])


def test_export_of_run_without_checkpoint_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err


def test_resume_never_refuses_a_run_dir_with_checkpoints(finished, shards):
    raw = finished_config(shards)
    raw["ckpt"]["resume"] = "never"
    with pytest.raises(CheckpointError, match="already has checkpoints.*ckpt.resume=never"):
        train_inprocess(raw, finished)


def test_rerun_of_finished_run_is_a_noop(finished, shards, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    assert train_inprocess(finished_config(shards), run) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert_same_weights(weights(run), weights(finished))


def test_interrupted_save_keeps_previous_checkpoint_and_resume_is_exact(finished, shards, tmp_path, monkeypatch):
    """Crash after DeepSpeed wrote step 6 but before its manifest/latest: latest stays at step 4, which loads;
    re-running resumes from it and ends bit-identical to the uninterrupted run."""
    run = tmp_path / "run"
    real = manifest.write_manifest
    calls = []

    def crash_on_third(ckpt_dir, entries):
        calls.append(ckpt_dir.name)
        if len(calls) == 3:
            raise RuntimeError("simulated crash during checkpoint publication")
        real(ckpt_dir, entries)

    monkeypatch.setattr(manifest, "write_manifest", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_inprocess(finished_config(shards), run)
    monkeypatch.setattr(manifest, "write_manifest", real)
    assert latest_name(run) == "step_00000004"
    assert (run / "checkpoints" / "step_00000006.partial" / "model").is_dir()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]  # logged before the crash
    assert train_inprocess(finished_config(shards), run) == 0
    assert not list((run / "checkpoints").glob("*.partial"))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]  # steps 5-6 re-logged once
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(finished)]
    assert_same_weights(weights(run), weights(finished))
    assert_same_weights(weights(run, use_ema=True), weights(finished, use_ema=True))


def test_corrupted_checkpoint_is_detected_by_checksum(finished, shards, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    target = run / "checkpoints" / "step_00000006" / "model" / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    raw = finished_config(shards)
    raw["train"]["max_steps"] = 8
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: sha256 mismatch"):
        train_inprocess(raw, run)
    assert main(["export", str(run), "--out", str(tmp_path / "b")]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def _rewrite_trainer_json(ckpt: Path, **changes) -> None:
    meta = json.loads((ckpt / "trainer.json").read_text())
    meta.update(changes)
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    entries = json.loads((ckpt / manifest.MANIFEST).read_text())["files"]
    entries.update(manifest.describe(ckpt, ["trainer.json"]))  # a consistent manifest: only the content differs
    manifest.write_manifest(ckpt, entries)


@pytest.mark.parametrize("changes, message", [
    ({"world_size": 2}, "was written by 2 ranks, this run has 1; resume with the same number of processes"),
    ({"format_version": 99}, "checkpoint format version 99, this code reads version 1"),
    ({"zero_stage": 3}, "zero_stage is 3 in the checkpoint but 0 in this run"),
])
def test_incompatible_checkpoint_is_refused(finished, shards, tmp_path, changes, message):
    run = copy_run(finished, tmp_path / "run")
    _rewrite_trainer_json(run / "checkpoints" / "step_00000006", **changes)
    raw = finished_config(shards)
    raw["train"]["max_steps"] = 8
    with pytest.raises(CheckpointError, match=message):
        train_inprocess(raw, run)


@pytest.mark.parametrize("zero", [0, 3])
def test_bf16_trains_and_exports_fp32_weights(shards, tmp_path, zero):
    raw = base_config(shards, train={"precision": "bf16", "max_steps": 3, "ema_decay": 0.9},
                      dist={"zero_stage": zero})
    run = tmp_path / "run"
    assert train_inprocess(raw, run) == 0
    records = read_metrics(run)
    assert all(r["loss"] is not None and r["skipped"]["nonfinite_steps"] == 0 for r in records)
    for use_ema in (False, True):
        state = weights(run, use_ema=use_ema)["model"]
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())


def test_init_from_loads_consolidated_ema_weights(finished, shards, tmp_path):
    """ckpt.init_from starts a new run from another run's (EMA) weights; a skipped first step keeps them as-is."""
    raw = base_config(shards, model={"width": 8, "nan_steps": [1]}, train={"max_steps": 1},
                      ckpt={"init_from": str(finished)})
    run = tmp_path / "run"
    assert train_inprocess(raw, run) == 0
    assert read_metrics(run)[0]["skipped"]["nonfinite_steps"] == 1
    assert_same_weights(weights(run), weights(finished, use_ema=True))


def test_export_refuses_weights_that_do_not_fit_the_stage(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000006"
    text = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(text.replace("width: 8", "width: 16"))
    entries = json.loads((ckpt / manifest.MANIFEST).read_text())["files"]
    entries.update(manifest.describe(ckpt, ["config.yaml"]))
    manifest.write_manifest(ckpt, entries)
    with pytest.raises(CheckpointError, match=r"conv\.weight has shape \(8, 3, 3, 3\) in the checkpoint"):
        from pipeline.export import export_run

        export_run(run, tmp_path / "bundle")
