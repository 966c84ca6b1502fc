"""The CLIP model: open_clip classes from our config, export loadable by open_clip, shipped real configs."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
import pytest
import torch

from pipeline.config import Config, DataConfig, load_config
from pipeline.errors import ConfigError
from pipeline.models.clip import ClipConfig, ClipTextConfig, ClipVisionConfig, build_clip
from pipeline.train.stage import StageContext
from pipeline.stages.clip import ClipStage

REPO = Path(__file__).resolve().parents[2]
TINY = ClipConfig(embed_dim=16, vision=ClipVisionConfig(image_size=32, patch_size=8, width=32, layers=1,
                                                        head_width=16),
                  text=ClipTextConfig(context_length=16, width=32, heads=2, layers=1))
CPU = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)


def tiny_stage(**model_overrides) -> ClipStage:
    from dataclasses import replace

    model = replace(TINY, **model_overrides)
    return ClipStage(Config(stage="clip", model=model, data=DataConfig(resolution=32)), CPU)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every weight away from its init so a test cannot pass on default values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_export_loads_in_open_clip_and_reproduces_embeddings(tmp_path, loss):
    stage = tiny_stage(loss=loss)
    model = perturbed(stage.build_trainable()["model"], 0).eval()
    stage.export({"model": model}, tmp_path / "clip")
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == ["open_clip_config.json",
                                                                       "open_clip_model.safetensors"]
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'clip'}")
    loaded.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'clip'}")
    captions = ["a large red circle on the left", "a small blue square at the top and a large green triangle"]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=g)
    ours_tokens = stage.sample_spec().tokenize(captions)["text"]
    assert torch.equal(tokenizer(captions), ours_tokens)  # same tokenizer conventions
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.encode_text(ours_tokens), model.encode_text(ours_tokens), atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(loaded.logit_scale, model.logit_scale)
    spec = stage.sample_spec()
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == pytest.approx(spec.image_mean) and tuple(normalize.std) == pytest.approx(
        spec.image_std)
    assert json.loads((tmp_path / "clip" / "open_clip_config.json").read_text())["preprocess_cfg"]["size"] == 32


def test_pretrained_from_exported_folder_is_strict(tmp_path):
    stage = tiny_stage()
    source = perturbed(stage.build_trainable()["model"], 3)
    stage.export({"model": source}, tmp_path / "clip")
    reloaded = build_clip(ClipConfig(**{**TINY.__dict__, "pretrained": str(tmp_path / "clip")}))
    for (name, a), (_, b) in zip(source.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    wider = ClipConfig(**{**TINY.__dict__, "embed_dim": 24, "pretrained": str(tmp_path / "clip")})
    with pytest.raises(ConfigError, match="does not fit"):
        build_clip(wider)
    with pytest.raises(ConfigError, match="neither an existing file"):
        build_clip(ClipConfig(**{**TINY.__dict__, "pretrained": str(tmp_path / "missing")}))


def test_tokenizer_survives_pickling_for_loader_workers():
    tokenize = tiny_stage().sample_spec().tokenize
    again = pickle.loads(pickle.dumps(tokenize))
    captions = ["a small white circle in the center"]
    out = again(captions)["text"]
    assert out.shape == (1, 16) and out.dtype == torch.int64 and torch.equal(out, tokenize(captions)["text"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.arch"):
        ClipConfig(arch="ViT-Q-99")
    with pytest.raises(ConfigError, match="only apply to arch 'custom'"):
        ClipConfig(arch="ViT-B-32", embed_dim=8)
    with pytest.raises(ConfigError, match="multiple of model.vision.patch_size"):
        ClipVisionConfig(image_size=30, patch_size=8) and ClipConfig(vision=ClipVisionConfig(image_size=30))
    with pytest.raises(ConfigError, match=r"data.resolution \(64\) must equal the CLIP image size \(32\)"):
        ClipStage(Config(stage="clip", model=TINY, data=DataConfig(resolution=64)), CPU)


@pytest.mark.parametrize("name, arch, params_millions", [("vit_b32", "ViT-B-32", 151.3), ("vit_l14", "ViT-L-14",
                                                                                          427.6)])
def test_real_configs_build(name, arch, params_millions):
    cfg = load_config(REPO / "configs" / "clip" / f"{name}.yaml")
    assert cfg.model.arch == arch
    stage = ClipStage(cfg, CPU)
    model = stage.build_trainable()["model"]  # random init, real tensors (ViT-L-14: 1.7 GB, ~5 s)
    assert isinstance(model, open_clip.CLIP)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_millions, abs=0.1)
    assert model.visual.conv1.weight.std() > 0 and model.transformer.resblocks[0].attn.in_proj_weight.std() > 0
    assert stage.sample_spec().image_size == 224 and stage.sample_spec().tokenize(["x"])["text"].shape == (1, 77)
    assert cfg.model.local_loss and cfg.dist.zero_stage >= 1


def test_training_step_learns_on_a_fixed_batch():
    torch.manual_seed(0)
    stage = tiny_stage()
    model = stage.build_trainable()["model"]
    g = torch.Generator().manual_seed(5)
    captions = [f"a {s} {c} circle on the left" for s in ("small", "large") for c in ("red", "blue", "green")]
    batch = {"image": torch.randn(len(captions), 3, 32, 32, generator=g), "caption": captions,
             **stage.sample_spec().tokenize(captions)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = stage.training_step({"model": model}, {}, batch, "model")
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.05 * first
    sums = stage.evaluate({"model": model.eval()}, {}, [batch])
    assert sums["t2i_recall@1"] == (6.0, 6.0) and sums["i2t_recall@1"] == (6.0, 6.0)


def test_activation_checkpointing_is_switched_on_by_the_train_config():
    from dataclasses import replace

    from pipeline.config import TrainConfig

    cfg = Config(stage="clip", model=TINY, data=DataConfig(resolution=32),
                 train=replace(TrainConfig(), activation_checkpointing=True))
    model = ClipStage(cfg, CPU).build_trainable()["model"]
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing
    assert not tiny_stage().build_trainable()["model"].transformer.grad_checkpointing
