"""Helpers for the generation-metric tests: a randomly initialised TF-Inception saved like the real weights file,
synthetic scenes as image tensors, and a tiny CLIP trained for a few dozen steps and exported as an open_clip folder."""
from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.synthetic import caption_for, render, sample_scene

TINY_CLIP = {"arch": "custom", "embed_dim": 32,
             "vision": {"image_size": 16, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
             "text": {"context_length": 16, "width": 64, "heads": 2, "layers": 2}}


def save_random_inception(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's FeatureExtractorInceptionV3 with random weights, its state dict saved to `path` (what the
    real weights file holds). The constructor always loads weights, so its loading is stubbed while building."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    torch.manual_seed(seed)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
        network = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in network.modules():  # He init: PyTorch's default conv init shrinks activations ~40 layers deep
        if isinstance(module, torch.nn.Conv2d):  # until every image gives the same features (FID ~1e-13)
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), path)
    return path


def scenes(n: int, split: str = "train", seed: int = 0, resolution: int = 16) -> tuple[torch.Tensor, list[str]]:
    """n synthetic scenes as float images (n, 3, R, R) in [0, 1] and their captions."""
    images, captions = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        objects = sample_scene(rng, split, resolution)
        images.append(torch.from_numpy(np.array(render(objects, resolution, rng))).permute(2, 0, 1))
        captions.append(caption_for(objects))
    return torch.stack(images).float() / 255, captions


def train_tiny_clip(out_dir: Path, steps: int = 60, batch: int = 64, seed: int = 0) -> Path:
    """A tiny CLIP trained `steps` steps (contrastive loss, fresh train scenes each step), exported by ClipStage."""
    from pipeline.config import load_config
    from pipeline.models.clip import ClipTokenize, build_clip
    from pipeline.models.frozen_clip import OPENAI_MEAN, OPENAI_STD
    from pipeline.stages.clip import ClipStage
    from pipeline.train.stage import StageContext

    cfg = load_config(None, base={"stage": "clip", "model": TINY_CLIP, "data": {"resolution": 16}})
    torch.manual_seed(seed)
    model = build_clip(cfg.model).train()
    tokenize = ClipTokenize(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    for step in range(steps):
        images, captions = scenes(batch, "train", seed=1000 + step)
        image_f = F.normalize(model.encode_image((images - mean) / std), dim=-1)
        text_f = F.normalize(model.encode_text(tokenize(captions)["text"]), dim=-1)
        logits = model.logit_scale.exp() * image_f @ text_f.T
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    stage = ClipStage(cfg, StageContext(rank=0, world_size=1, device=torch.device("cpu"),
                                        compute_dtype=torch.float32))
    stage.export({"model": model.eval()}, out_dir)
    return out_dir
