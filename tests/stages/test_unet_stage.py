"""The `unet` stage through the one Trainer (in-process, ZeRO-0): base and super-resolution train, evaluate
(denoising loss per timestep bucket, prompt fidelity with and without guidance), write EMA sample grids, and
export a diffusers folder that `UNet2DConditionModel.from_pretrained` loads and that gives our outputs."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import ConfigError, PipelineError
from pipeline.export import export_run
from train_helpers import read_metrics, train_inprocess
from unet_helpers import unet_config


@pytest.mark.parametrize("super_res", [False, True], ids=["base", "super_res"])
def test_stage_trains_evaluates_samples_and_exports(super_res, shards, tmp_path):
    from diffusers import UNet2DConditionModel

    run = tmp_path / "run"
    assert train_inprocess(unet_config(shards, super_res=super_res), run) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for key in ("eval/loss_t0000-0249", "eval/loss_t0750-0999", "eval/fidelity_colour",
                "eval/fidelity_colour_no_guidance", "eval/fidelity_position"):
        assert key in evals[-1] and 0.0 <= evals[-1][key] < 10.0, key
    assert (run / "samples" / "step_00000003.png").is_file() and (run / "samples" / "step_00000006.png").is_file()

    component = export_run(run, tmp_path / "bundle")
    name = "unet_sr16" if super_res else "unet_base"
    assert component.name == name and (component / "diffusion_pytorch_model.safetensors").is_file()
    stage = json.loads((component / "t2i_stage.json").read_text())
    scheduler = json.loads((component / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["prediction_type"] == "v_prediction"
    loaded = UNet2DConditionModel.from_pretrained(str(component)).eval()
    side = 16
    x = torch.randn(2, loaded.config.in_channels, side, side)
    text = torch.randn(2, 5, stage["conditioning"]["text_dim"])
    labels = torch.randn(2, loaded.config.projection_class_embeddings_input_dim)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = loaded(x, torch.tensor([3, 700]), text, class_labels=labels, encoder_attention_mask=mask).sample
    assert out.shape == (2, 3, side, side) and torch.isfinite(out).all()


def test_wrong_super_resolution_size_is_one_clear_line(shards, tmp_path):
    raw = unet_config(shards, super_res=True, model={"super_res": {"low_res": 16}})
    with pytest.raises(ConfigError, match=r"model.super_res.low_res \(16\) must be smaller than data.resolution"):
        train_inprocess(raw, tmp_path / "run")


def test_missing_t5_path_is_one_clear_line(shards, tmp_path):
    raw = unet_config(shards, model={"text_encoder": {"path": str(tmp_path / "no-t5"), "max_length": 8}})
    with pytest.raises(PipelineError, match="model.text_encoder.path: .*no-t5 does not exist"):
        train_inprocess(raw, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_held_out_loss_of_a_super_resolution_stage_is_on_fixed_noise(shards):
    """Every random draw of the held-out loss is fixed by the batch index, the low-res image's augmentation noise
    included: two evaluations of the same weights give the same numbers whatever the global RNG did between."""
    from pipeline.config import load_config
    from pipeline.train.stage import StageContext
    from pipeline.stages.unet import UNetStage
    from pipeline.text.t5 import T5Tokenize

    raw = unet_config(shards, super_res=True, model={"eval_prompts": 0})
    cfg = load_config(None, base=raw)
    stage = UNetStage(cfg, StageContext(rank=0, world_size=1, device=torch.device("cpu"),
                                        compute_dtype=torch.float32))
    models, frozen = stage.build_trainable(), stage.build_frozen()
    captions = ["a large red circle on the left", "a small blue square at the top"] * 2
    batch = {"image": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "caption": captions, **T5Tokenize("tiny", 16)(captions)}
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            results.append(stage.evaluate(models, frozen, [batch]))
    assert results[0] == results[1] and results[0]["loss"][1] == 4
