"""A DiT + flow-matching `unet` stage end to end: the demo config (configs/demo/dit_flow.yaml) trains with only its
data keys changed, evaluates, samples, exports a diffusers folder (PixArtTransformer2DModel + a
FlowMatchEulerDiscreteScheduler config) that the stock classes load, and samples again from the bundle."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.export import export_run
from train_helpers import read_metrics, train_inprocess

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def dit_demo_config(shards: Path, *, super_res: bool = False) -> dict:
    """configs/demo/dit_flow.yaml as shipped, with the test's shards and a 6-step schedule (eval/grid at 3)."""
    raw = yaml.safe_load((REPO / "configs" / "demo" / "dit_flow.yaml").read_text(encoding="utf-8"))
    raw["data"].update(urls=str(shards / "train"), eval_urls=str(shards / "heldout"), num_workers=0,
                       shuffle_buffer=16)
    raw["train"] = {"max_steps": 6, "micro_batch_size": 4, "log_every": 1, "sample_every": 3, "ema_decay": 0.9,
                    "seed": 0}
    raw["eval"] = {"every_steps": 3, "max_samples": 8, "batch_size": 4}
    raw["ckpt"] = {"every_steps": 3, "keep_last": 0}
    raw["log"] = {"tensorboard": False, "progress_bar": False}
    raw["model"].update(eval_prompts=4, grid_images=4)
    raw["model"]["sampling"]["sampler"]["steps"] = 4
    if super_res:
        raw["model"].update(name="sr16", super_res={"low_res": 8, "level_embed_dim": 8})
    return raw


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
