"""The Stage protocol: everything the one Trainer needs to know about a kind of model.

A stage owns its networks, losses and data needs; the Trainer owns the loop, the DeepSpeed engines,
checkpoints, EMA, logging and fault handling. There are no stage-specific branches in the Trainer.

Lifecycle (per process)::

    stage = StageClass(cfg, ctx)
    spec = stage.sample_spec()                 # what the data reader must produce per sample/batch
    stage.input_paths()                        # files the model config names; the Trainer checks they exist
    trainable = stage.build_trainable()        # {"model": m} or {"generator": g, "discriminator": d}
    frozen = stage.build_frozen()              # frozen helpers (T5, CLIP, autoencoder), may be {}
    # Trainer: frozen -> eval(), requires_grad_(False), compute dtype, device; one engine per trainable part
    for each optimizer step:
        for each micro-batch:
            for part in trainable (dict order):
                out = stage.training_step(engines, frozen, batch, part)
                engines[part].backward(out.loss); engines[part].step()
    stage.evaluate(engines, frozen, eval_batches) -> sums/counts, reduced across ranks by the Trainer
    stage.sample_images(engines, frozen) -> image grid for generative stages
    stage.export(modules, out_dir)             # consolidated full weights (EMA applied) -> bundle component

Multi-part stages (GAN) step their parts in order on the same micro-batch; a stage may keep tensors from one
part's step for the next (e.g. detached reconstructions for the discriminator).

What `models` holds (Trainer contract): in ``training_step(models, ..., part)`` the active `part` is its DeepSpeed
engine and every other part is its plain module with ``requires_grad`` switched off for the duration of the call,
so a generator loss that runs through the discriminator neither accumulates discriminator gradients nor fires
that engine's backward hooks. In ``evaluate`` and ``sample_images`` every part is its plain module (eval mode,
no grad, with its EMA weights applied when the run keeps an EMA: what export will ship). Under ZeRO-3 the plain modules still gather their partitioned parameters in forward, which is
collective: every rank must run the same forward passes. The Trainer hands ``evaluate`` batches in lockstep
(a batch only while every rank has one), so a stage just iterates what it is given.
Batches: the Trainer applies ``pipeline.data.spec.normalize_batch`` to every training and evaluation batch, so
``batch["image"]`` arrives normalised, on ``ctx.device``, in ``ctx.compute_dtype``; every other entry is as the
loader made it (CPU tensors, lists), and the stage moves what it needs to the device.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.spec import SampleSpec


class StepOutput(NamedTuple):
    """Result of one forward pass of one trainable part.

    loss: scalar tensor to backpropagate (already divided by nothing: the engine handles accumulation).
    metrics: scalar values to log, e.g. {"loss/contrastive": ..., "logit_scale": ...}; tensors are detached.
    """

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor]


# Evaluation returns, per metric, (sum over samples, number of samples) so the Trainer can reduce exactly
# across ranks and batches of unequal size: mean = total_sum / total_count.
EvalSums = dict[str, tuple[float, float]]


class MetricSums:
    """(sum, count) per metric, folded over batches, micro-steps or ranks; mean = sum / count.

    The one fold of metrics in the package: a stage's evaluation adds its batches' sums, the step runner its
    micro-steps' values, the Trainer every rank's shares, and ranks with unequal shares still reduce exactly.
    """

    def __init__(self) -> None:
        self._totals: dict[str, list[float]] = {}

    def add(self, key: str, total: float, count: float = 1.0) -> None:
        acc = self._totals.setdefault(key, [0.0, 0.0])
        acc[0] += float(total)
        acc[1] += float(count)

    def merge(self, sums: Mapping[str, tuple[float, float]], prefix: str = "") -> None:
        """Add every (sum, count) of `sums` (an :data:`EvalSums`), under ``prefix + key``."""
        for key, (total, count) in sums.items():
            self.add(prefix + key, total, count)

    def sums(self) -> EvalSums:
        """The plain {key: (sum, count)} (what a stage's evaluate returns; picklable for a gather)."""
        return {key: (total, count) for key, (total, count) in self._totals.items()}

    def means(self, prefix: str = "") -> dict[str, float]:
        """{prefix + key: sum / count}; metrics that counted nothing (count 0) are left out."""
        return {prefix + key: total / count for key, (total, count) in self._totals.items() if count > 0}


@dataclass(frozen=True)
class StageContext:
    """Where and how a stage runs. Passed in; stages never read environment variables or globals."""

    rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype
    run_dir: Path | None = None


class Stage:
    """Base class of every stage kind (inheritance stops here: concrete stages subclass this directly)."""

    name: ClassVar[str]
    model_config_cls: ClassVar[type]

    def __init__(self, cfg: Config, ctx: StageContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    def sample_spec(self) -> SampleSpec:
        """What the data reader must produce: image size and normalisation, caption tokenization, arrays."""
        raise NotImplementedError

    def input_paths(self) -> dict[str, str]:
        """Local files or folders the model config names (pretrained weights, T5, frozen helpers), keyed by their
        config key. The Trainer checks that each exists before anything is built; hub ids are left out (the library
        resolves them when loading)."""
        return {}

    def build_trainable(self) -> dict[str, nn.Module]:
        """Freshly initialised trainable modules keyed by part name; one optimizer/engine per part."""
        raise NotImplementedError

    def build_frozen(self) -> dict[str, nn.Module]:
        """Frozen helper modules (loaded from their checkpoints); the Trainer freezes and places them."""
        return {}

    def training_step(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                      batch: dict, part: str) -> StepOutput:
        """Forward pass of `part` on one micro-batch; returns the loss to backpropagate and metrics."""
        raise NotImplementedError

    def evaluate(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                 batches: Iterable[dict]) -> EvalSums:
        """Held-out metrics on this rank's share of the eval split, as (sum, count) per metric."""
        return {}

    def sample_images(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], seed: int,
                      batch: dict | None = None) -> torch.Tensor | None:
        """A few generated images (N, 3, H, W) in [0, 1] for the periodic sample grid; None if not generative.
        `batch`: this rank's first held-out batch (normalised like evaluation batches; its prompts and images are
        what the grid shows), or None when the run has no data.eval_urls."""
        return None

    def component_name(self) -> str:
        """Folder name of this stage's component inside an export bundle (e.g. 'clip', 'unet_base')."""
        return self.name

    def export(self, modules: Mapping[str, nn.Module], out_dir: Path) -> dict[str, Any] | None:
        """Write the consolidated (full, unsharded, EMA-applied, already cast to the export dtype) `modules` as a
        bundle component in `out_dir`; return what the bundle index should say about it beyond the generic
        fields (e.g. a U-Net stage's resolution and default sampling settings), or None."""
        raise NotImplementedError

    def export_helpers(self, bundle: Path, dtype: torch.dtype, reference: bool) -> dict[str, dict[str, Any]]:
        """Write the frozen helpers a sampler of this component needs (e.g. the T5 of a U-Net stage) as bundle
        components of their own and return their index entries; `reference`: index large helpers by their
        original path instead of copying them."""
        return {}
