"""Tiny `prior` stage configs and a tiny exported CLIP folder for the prior tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from train_helpers import base_config

# W (32) != E (16) on purpose: the per-token encodings go through the CLIP's text projection.
TINY_CLIP = {"arch": "custom", "embed_dim": 16,
             "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
             "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1}}
TINY_PRIOR = {"heads": 2, "head_dim": 16, "layers": 2}


def export_tiny_clip(out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny open_clip CLIP written by ClipStage.export (the real export path)."""
    from pipeline.config import load_config
    from pipeline.models.clip import build_clip
    from pipeline.train.stage import StageContext
    from pipeline.stages.clip import ClipStage

    cfg = load_config(None, base={"stage": "clip", "model": TINY_CLIP, "data": {"resolution": 16}})
    stage = ClipStage(cfg, StageContext(rank=0, world_size=1, device=torch.device("cpu"),
                                        compute_dtype=torch.float32))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = build_clip(cfg.model).eval()
    torch.random.set_rng_state(state)
    stage.export({"model": model}, out_dir)
    return out_dir


def prior_config(shards: Path, clip_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A 16 px prior run on the tiny CLIP: 8 steps, eval at 4 and 8, DDIM 4 steps, 2 candidates."""
    model: dict[str, Any] = {"clip": str(clip_dir), "prior": TINY_PRIOR, "stats_samples": 64,
                             "sampling": {"sampler": {"name": "ddim", "steps": 4}, "guidance": 2.0,
                                          "candidates": 2}}
    raw = base_config(shards, train={"max_steps": 8, "micro_batch_size": 8, "grad_accum_steps": 1, "log_every": 1},
                      eval={"every_steps": 4, "max_samples": 16, "batch_size": 8}, optim={"lr": 3e-3},
                      ckpt={"every_steps": 4})
    raw["stage"] = "prior"
    raw["model"] = {**model, **sections.pop("model", {})}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def expected_stats(clip_dir: Path, urls: Path, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std (E,) of the CLIP image embeddings of the first `samples` samples of `urls`, in
    shard order with center crops, computed here without the stage."""
    from pipeline.config import DataConfig
    from pipeline.data.loader import build_eval_loader
    from pipeline.data.spec import SampleSpec, normalize_batch
    from pipeline.models.frozen_clip import FrozenClip

    clip = FrozenClip.load(clip_dir)
    info = clip.info
    spec = SampleSpec(image_size=info.image_size, image_mean=info.mean, image_std=info.std)
    data = DataConfig(eval_urls=str(urls), resolution=info.image_size, num_workers=0)
    loader = build_eval_loader(data, spec, batch_size=samples, max_samples=samples, rank=0, world_size=1)
    images = torch.cat([normalize_batch(b, spec, "cpu", torch.float32)["image"] for b in loader])
    assert images.shape[0] == samples
    emb = clip.encode_image(images).double()
    return emb.mean(dim=0).float(), emb.std(dim=0).float()
