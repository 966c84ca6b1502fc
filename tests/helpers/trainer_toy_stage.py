"""A tiny stage for the Trainer's tests: predicts an image's mean colour from the image and its caption.

Importable as ``stage: trainer_toy_stage:ToyStage`` when tests/helpers is on sys.path (pytest puts it there;
subprocess tests pass it in PYTHONPATH). Test hooks live in its model config, never in the Trainer:

- ``two_part``: a "generator" (the regressor) and a "critic" with its own optimizer; the generator loss runs
  through the critic (like a GAN generator loss), the critic is trained on detached predictions.
- ``nan_steps``: the N-th optimizer steps *of this process* (1-based, counting replays after a rollback) whose
  loss is NaN (its gradients stay finite) on rank ``nan_rank`` (-1: every rank); each fires once, so a rollback
  can recover.
- ``nan_grad_steps``: same, but only the gradient is non-finite (the loss stays finite).
- ``step_sleep_s``: sleep per micro-batch so a test can signal a running job.
- ``hang_at_step``: rank ``hang_rank`` hangs there (collective-timeout test).
"""
from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.config_schema import doc
from pipeline.data.spec import SampleSpec
from pipeline.train.stage import EvalSums, Stage, StepOutput

VOCAB = 64
LENGTH = 12


class HashTokenize:
    """Words -> ids by CRC32 (picklable, deterministic): int64 (B, LENGTH), 0 = padding."""

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = torch.zeros(len(captions), LENGTH, dtype=torch.int64)
        for i, caption in enumerate(captions):
            ids = [1 + zlib.crc32(w.encode()) % (VOCAB - 1) for w in caption.split()][:LENGTH]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return {"text": out}


@dataclass(frozen=True)
class ToyConfig:
    width: int = doc(8, "Hidden channels.")
    image_size: int = doc(16, "Pixels.")
    two_part: bool = doc(False, "Also train a critic part with its own optimizer (GAN-like).")
    nan_steps: tuple[int, ...] = doc((), "Process-local optimizer steps with a NaN loss (each fires once).")
    nan_grad_steps: tuple[int, ...] = doc((), "Process-local optimizer steps with a NaN gradient, finite loss.")
    nan_rank: int = doc(-1, "Rank that misbehaves; -1 every rank.")
    step_sleep_s: float = doc(0.0, "Seconds slept per micro-batch.")
    hang_at_step: int = doc(0, "Process-local optimizer step at which rank `hang_rank` hangs (sleeps an hour).")
    hang_rank: int = doc(1, "Rank that hangs.")


class Regressor(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.embed = nn.Embedding(VOCAB, width)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.Tanh(), nn.Linear(width, 3))
        self.register_buffer("scale", torch.ones(3))  # a buffer: must survive checkpoint + export too
        self.gain = nn.Parameter(torch.tensor(1.0))  # a 0-dim parameter, like CLIP's logit_scale

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S), (B, L) -> (B, 3)"""
        img = torch.relu(self.conv(image)).mean(dim=(2, 3))
        txt = self.embed(text).mean(dim=1)
        return self.head(torch.cat([img, txt], dim=1)) * self.scale * self.gain


class Critic(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, colour: torch.Tensor) -> torch.Tensor:
        return self.net(colour).squeeze(-1)


class ToyStage(Stage):
    name = "toy"
    model_config_cls = ToyConfig

    def __init__(self, cfg, ctx) -> None:
        super().__init__(cfg, ctx)
        self.mcfg: ToyConfig = cfg.model
        self.micro_calls = 0  # training_step calls of the first part in this process
        self.fake: torch.Tensor | None = None

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(image_size=self.mcfg.image_size, tokenize=HashTokenize())

    def build_trainable(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"generator" if self.mcfg.two_part else "model": Regressor(self.mcfg.width)}
        if self.mcfg.two_part:
            parts["critic"] = Critic(self.mcfg.width)
        return parts

    def _process_step(self) -> int:
        return self.micro_calls // self.cfg.train.grad_accum_steps + 1

    def _misbehaves(self, steps: tuple[int, ...]) -> bool:
        rank_ok = self.mcfg.nan_rank in (-1, self.ctx.rank)
        return rank_ok and self._process_step() in steps

    def _predict(self, model: nn.Module, batch: dict, noisy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"].to(self.ctx.device, self.ctx.compute_dtype)
        if noisy:  # draws from python, numpy and torch RNGs, like augmentation / diffusion noise would
            scale = 0.05 * (0.5 + random.random()) * (0.5 + float(np.random.rand()))
            image = image + scale * torch.randn_like(image)
        pred = model(image, batch["text"].to(self.ctx.device)).float()
        target = batch["image"].float().mean(dim=(2, 3)).to(self.ctx.device)
        return pred, target

    def training_step(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], batch: dict,
                      part: str) -> StepOutput:
        first = next(iter(models))
        if part == first:
            if self.mcfg.step_sleep_s:
                time.sleep(self.mcfg.step_sleep_s)
            if self.mcfg.hang_at_step == self._process_step() and self.ctx.rank == self.mcfg.hang_rank:
                time.sleep(3600)  # a stuck rank: its peers must fail at dist.timeout_s, not wait forever
            pred, target = self._predict(models[part], batch, noisy=True)
            loss = (pred - target).pow(2).mean()
            if self._misbehaves(self.mcfg.nan_steps):
                # NaN value, finite gradients: only the collective loss check can catch this step
                loss = loss + torch.tensor(float("nan"), device=loss.device)
            if self._misbehaves(self.mcfg.nan_grad_steps):
                # finite value, infinite gradient: d/dx sqrt(x) at x = 0
                loss = loss + torch.sqrt((pred * 0.0).pow(2).sum())
            self.micro_calls += 1
            metrics = {"mse": loss.detach()}
            if "critic" in models:
                self.fake = pred.detach()
                loss = loss + 0.01 * models["critic"](pred).mean()
            return StepOutput(loss, metrics)
        real = batch["image"].float().mean(dim=(2, 3)).to(self.ctx.device)
        critic = models[part]
        loss = torch.relu(1.0 - critic(real)).mean() + torch.relu(1.0 + critic(self.fake)).mean()
        return StepOutput(loss, {"hinge": loss.detach()})

    def evaluate(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                 batches: Iterable[dict]) -> EvalSums:
        total, count = 0.0, 0.0
        for batch in batches:
            pred, target = self._predict(models[next(iter(models))], batch)
            total += float((pred - target).pow(2).mean(dim=1).sum())
            count += pred.shape[0]
        return {"mse": (total, count)}

    def sample_images(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], seed: int,
                      batch: dict | None = None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        image = torch.rand(4, 3, self.mcfg.image_size, self.mcfg.image_size, generator=gen)
        text = torch.randint(1, VOCAB, (4, LENGTH), generator=gen)
        colour = models[next(iter(models))](image.to(self.ctx.device, self.ctx.compute_dtype),
                                             text.to(self.ctx.device)).float()
        return (colour.sigmoid()[:, :, None, None].expand(-1, -1, 8, 8)).cpu()

    def export(self, modules: Mapping[str, nn.Module], out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, module in modules.items():
            state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()
                     if v.is_floating_point()}
            save_file(state, str(out_dir / f"{name}.safetensors"))
        (out_dir / "config.json").write_text(json.dumps({"width": self.mcfg.width, "parts": list(modules)}))
