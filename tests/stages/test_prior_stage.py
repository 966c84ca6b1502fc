"""The `prior` stage through the one Trainer (in-process, ZeRO-0): it trains, evaluates cosine and retrieval
against the true image embeddings, sets clip_mean/clip_std from the training data and keeps them frozen, and
exports a diffusers folder that `PriorTransformer.from_pretrained` loads and that reproduces our predictions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.export import export_run
from pipeline.models.diffusers_attention import install_attention
from pipeline.models.frozen_clip import FrozenClip
from pipeline.models.prior import normalize_embedding, prior_forward
from pipeline.sampling.prior import PriorSampler
from pipeline.train.stage import StageContext
from pipeline.stages.prior import PriorStage
from pipeline.train.ema import read_full_ema
from pipeline.models.loading import load_strict
from prior_helpers import expected_stats, export_tiny_clip, prior_config
from train_helpers import read_metrics, train_inprocess, weights

CPU = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)
EVAL_KEYS = ("prior_cos", "baseline_cos", "prior_retrieval@1", "baseline_retrieval@1", "prior_retrieval@5", "loss")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return export_tiny_clip(tmp_path_factory.mktemp("stage_clip") / "clip", seed=4)


def _assert_stats(state: dict[str, torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> None:
    torch.testing.assert_close(state["clip_mean"].reshape(-1), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state["clip_std"].reshape(-1), std, atol=1e-6, rtol=1e-5)


def test_stage_trains_evaluates_keeps_statistics_and_exports(shards, clip_dir, tmp_path):
    from diffusers import PriorTransformer

    run = tmp_path / "run"
    assert train_inprocess(prior_config(shards, clip_dir, train={"ema_decay": 0.9}), run) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    evals = [r for r in records if "eval/prior_cos" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for key in EVAL_KEYS:
        assert key == "loss" or -1.0 <= evals[-1][f"eval/{key}"] <= 1.0, key
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]  # held-out loss with fixed noise falls
    # clip_mean/clip_std: the training data's statistics, unchanged by training (checkpoints 4 and 8, weights and
    # EMA), not in the EMA's parameters, and in the export
    mean, std = expected_stats(clip_dir, shards / "train", 64)
    assert float(std.min()) > 0
    for checkpoint, use_ema in (("step_00000004", False), ("latest", False), ("latest", True)):
        _assert_stats(weights(run, checkpoint, use_ema)["prior"], mean, std)
    ema = read_full_ema(run / "checkpoints" / "step_00000008", "prior")
    assert ema and "proj_in.weight" in ema and not {"clip_mean", "clip_std"} & set(ema)

    component = export_run(run, tmp_path / "bundle")
    assert component.name == "prior"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "scheduler", "t2i_prior.json"} <= \
        {p.name for p in component.iterdir()}
    scheduler = json.loads((component / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["prediction_type"] == "sample"  # x0
    meta = json.loads((component / "t2i_prior.json").read_text())
    assert meta["target"] == "x0" and meta["clip"]["embed_dim"] == 16 and meta["sampling"]["candidates"] == 2
    assert Path(meta["clip"]["path"]) == clip_dir.resolve() and len(meta["clip"]["weights_sha256"]) == 64
    loaded = PriorTransformer.from_pretrained(str(component)).eval()  # diffusers' own attention processors
    _assert_stats(loaded.state_dict(), mean, std)
    # our normalisation of the target is what diffusers' post_process_latents undoes
    emb = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.post_process_latents(normalize_embedding(emb, mean, std)), emb)

    # The export reproduces our predictions: forward passes (exactly with our processor, within float rounding
    # with diffusers' default one) and sampled embeddings.
    stage = PriorStage(load_config(run / "config.yaml"), CPU)
    ours = stage.build_trainable()["prior"]
    load_strict(ours, weights(run, use_ema=True)["prior"], "ema")
    ours.eval()
    clip = FrozenClip.load(clip_dir)
    prompts = ["a small red circle on the left", "a large blue square"]
    text = clip.encode_prompts(prompts)
    cond = {"tokens": clip.project_tokens(text.tokens), "mask": text.mask, "text_emb": text.pooled}
    x_t, t = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    with torch.no_grad():
        want = prior_forward(ours, x_t, t, cond)
        torch.testing.assert_close(prior_forward(loaded, x_t, t, cond), want, atol=1e-5, rtol=1e-5)
        install_attention(loaded, "sdpa")
        assert torch.equal(prior_forward(loaded, x_t, t, cond), want)
    sampler = PriorSampler.from_pretrained(component)
    assert torch.equal(sampler.embed(prompts, seed=3), stage.sampler(ours, clip).embed(prompts, seed=3))


def test_precomputed_image_embeddings_train_with_the_same_statistics(shards, clip_dir, tmp_path):
    pre = tmp_path / "pre"
    for split in ("train", "heldout"):
        assert main(["shards", "precompute", str(shards / split), "--out", str(pre / split),
                     "--encoder", f"clip-image:{clip_dir}"]) == 0
    raw = prior_config(shards, clip_dir, model={"image_source": "precomputed"},
                       data={"precomputed_urls": str(pre / "train"), "eval_precomputed_urls": str(pre / "heldout")},
                       train={"max_steps": 4}, eval={"every_steps": 4})
    run = tmp_path / "run"
    assert train_inprocess(raw, run) == 0
    assert all(f"eval/{key}" in read_metrics(run)[-1] for key in EVAL_KEYS)
    _assert_stats(weights(run)["prior"], *expected_stats(clip_dir, shards / "train", 64))


def test_missing_clip_is_one_clear_line(shards, tmp_path):
    raw = prior_config(shards, tmp_path / "no-clip")
    with pytest.raises(PipelineError, match="model.clip: .*no-clip does not exist"):
        train_inprocess(raw, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_zero1_checkpoint_exports_the_frozen_statistics(shards, clip_dir, tmp_path):
    """ZeRO-1 keeps frozen parameters only in the module state, which zero_to_fp32 does not read: the consolidated
    weights must still hold clip_mean/clip_std (export and ckpt.init_from read them)."""
    raw = prior_config(shards, clip_dir, train={"max_steps": 2}, dist={"zero_stage": 1})
    run = tmp_path / "run"
    assert train_inprocess(raw, run) == 0
    _assert_stats(weights(run)["prior"], *expected_stats(clip_dir, shards / "train", 64))
