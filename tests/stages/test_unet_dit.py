"""A DiT + flow-matching `unet` stage end to end: the demo config (configs/demo/dit_flow.yaml) trains with only its
data keys changed, evaluates, samples, exports a diffusers folder (PixArtTransformer2DModel + a
FlowMatchEulerDiscreteScheduler config) that the stock classes load, and samples again from the bundle."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.export import export_run
from train_helpers import read_metrics, train_inprocess
from unet_helpers import dit_demo_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parametrize("super_res", [False, True], ids=["base", "super_res"])
def test_dit_flow_stage_trains_evaluates_samples_and_exports(super_res, shards, tmp_path):
    import diffusers
    from diffusers import PixArtTransformer2DModel

    run = tmp_path / "run"
    assert train_inprocess(dit_demo_config(shards, super_res=super_res), run) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records if "train/loss" in r)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for key in ("eval/loss_t0000-0249", "eval/loss_t0750-0999", "eval/fidelity_colour"):
        assert key in evals[-1] and 0.0 <= evals[-1][key] < 10.0, key
    assert (run / "samples" / "step_00000006.png").is_file()

    component = export_run(run, tmp_path / "bundle")
    scheduler = json.loads((component / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 1.0
    loaded_scheduler = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    loaded_scheduler.set_timesteps(4)
    assert float(loaded_scheduler.sigmas[0]) == 1.0 and float(loaded_scheduler.sigmas[-1]) == 0.0
    stage = json.loads((component / "t2i_stage.json").read_text())
    assert stage["conditioning"]["backbone"] == "dit" and stage["model"]["diffusion"]["objective"] == "flow"
    loaded = PixArtTransformer2DModel.from_pretrained(str(component)).eval()
    x = torch.randn(2, loaded.config.in_channels, 16, 16)
    text = torch.randn(2, 5, stage["conditioning"]["text_dim"])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    added = {"resolution": None, "aspect_ratio": None}
    if super_res:
        added = {"resolution": torch.tensor([[16.0, 16.0]] * 2), "aspect_ratio": torch.tensor([[200.0]] * 2)}
    with torch.no_grad():
        out = loaded(x, encoder_hidden_states=text, timestep=torch.tensor([3.0, 700.0]), added_cond_kwargs=added,
                     encoder_attention_mask=mask).sample
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    if not super_res:  # a bundle with a base DiT samples through the library's cascade
        from pipeline.sampling.text2image import Text2Image

        images = Text2Image.from_bundle(tmp_path / "bundle").generate("a large red circle on the left", steps=3)
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
