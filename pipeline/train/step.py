"""One optimizer step: gradient accumulation over micro-batches, every trainable part in order, and the
collective decision to skip a non-finite step.

How a step is skipped with DeepSpeed (fp32/bf16 included, where DeepSpeed only partly checks by itself):

1. Every micro-batch's loss is backpropagated and ``engine.step()`` is called as usual, even when it is NaN,
   so DeepSpeed's hooks, gradient buckets and micro/global step counters advance exactly as in a normal step.
2. At the accumulation boundary, after the last backward (gradients are reduced) and *before* ``engine.step()``,
   each rank contributes two flags to one all-reduce(MAX): "some loss of this step was non-finite here" and,
   at ZeRO-0 (full, already all-reduced gradients on every rank; fp16 excluded, where overflow is the loss
   scaler's business), "the gradient norm is non-finite". All ranks thus take the same decision.
3. To skip, the part's :class:`~pipeline.train.backend.StepGate` turns the *inner* optimizer update into a no-op
   for that one ``engine.step()``: weights, fp32 master copies and Adam moments stay bit-identical, and
   DeepSpeed still zeroes its (partitioned) gradient buffers and advances its counters.
4. At ZeRO 1-3, DeepSpeed computes the global gradient norm itself and skips the update when it is not finite
   (its overflow path; ``engine.was_step_applied()`` is then False); that also counts as a non-finite step,
   except in fp16 where it is ordinary dynamic loss scaling ("overflow" steps, never rolled back).
5. Belt and braces: a step that *was* applied although DeepSpeed reports a non-finite gradient norm marks
   the weights as suspect; the Trainer then rolls back at once.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.data.spec import SampleSpec, normalize_batch
from pipeline.train.stage import MetricSums, Stage
from pipeline.train import rng
from pipeline.train.backend import Dist, Part


@dataclass
class StepOutcome:
    """What one optimizer step did on this rank (losses are local means over this step's micro-batches)."""

    losses: dict[str, torch.Tensor]
    metrics: MetricSums = field(default_factory=MetricSums)  # per metric: (sum, count) over micro-steps
    applied: dict[str, bool] = field(default_factory=dict)
    nonfinite: bool = False  # some part skipped because of a non-finite loss or gradient
    overflow: bool = False  # some part skipped by fp16 dynamic loss scaling
    suspect: bool = False  # an update was applied with a non-finite gradient norm
    data_wait_s: float = 0.0


@contextmanager
def grads_only_for(parts: Mapping[str, Part], active: str) -> Iterator[None]:
    """While `active` steps, other parts' parameters do not require grad: a generator loss that runs through the
    discriminator then never accumulates discriminator gradients (which that engine would apply later)."""
    if len(parts) == 1:
        yield
        return
    frozen = [p for name, part in parts.items() if name != active
              for p in part.module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _zero0_grads_bad(part: Part, clip: float) -> torch.Tensor | None:
    """At ZeRO-0 every rank holds the full all-reduced gradient in .grad: clip it to `clip` (if > 0; the Trainer
    clips at ZeRO-0 fp32, see ds_config.trainer_clips_gradients) and say whether its norm is non-finite. Every rank
    computes the same norm from the same gradients, so no collective is needed for that part of the decision."""
    if part.zero_stage != 0:
        return None
    params = [p for p in part.module.parameters() if p.grad is not None]
    if not params:
        return None
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    return ~torch.isfinite(norm)


class StepRunner:
    """Runs optimizer steps of a stage's parts; no stage-specific logic here."""

    def __init__(self, stage: Stage, spec: SampleSpec, parts: Mapping[str, Part], frozen: Mapping[str, nn.Module],
                 dist: Dist, dtype: torch.dtype, accum: int, fp16: bool, clip: float) -> None:
        self.stage, self.spec, self.parts, self.frozen, self.dist = stage, spec, parts, frozen, dist
        self.dtype, self.clip = dtype, clip  # clip > 0 only where the Trainer (not DeepSpeed) clips
        # While one part steps, it is its DeepSpeed engine and the other parts are their plain modules: calling
        # another part's *engine* inside this part's loss (a GAN generator loss through the discriminator) would
        # fire that engine's backward hooks during this part's backward and corrupt its gradient buckets (ZeRO-2).
        self.models = {active: {name: part.engine if name == active else part.module for name, part in parts.items()}
                       for active in parts}
        self.accum, self.fp16 = accum, fp16

    def _next_batch(self, batches: Iterator[dict]) -> tuple[dict, float]:
        start = time.perf_counter()
        # The loader must not draw from (or be influenced by) the training RNG streams: a resumed run creates
        # its loader iterator at a different point of those streams than an uninterrupted one.
        with rng.isolated():
            batch = next(batches)
        waited = time.perf_counter() - start
        # uint8 images -> normalised, on the device, in the compute dtype (the data layer's contract)
        return normalize_batch(batch, self.spec, self.dist.device, self.dtype), waited

    def run(self, batches: Iterator[dict], lr: float, want_metrics: bool) -> StepOutcome:
        """Accumulate `accum` micro-batches through every part, then update each part (or skip collectively)."""
        device = self.dist.device
        loss_sum = {name: torch.zeros((), device=device) for name in self.parts}
        loss_bad = {name: torch.zeros((), dtype=torch.bool, device=device) for name in self.parts}
        outcome = StepOutcome(losses={})
        for part in self.parts.values():
            part.set_lr(lr)
        for micro in range(self.accum):
            batch, waited = self._next_batch(batches)
            outcome.data_wait_s += waited
            boundary = micro == self.accum - 1
            for name, part in self.parts.items():
                with grads_only_for(self.parts, name):
                    out = self.stage.training_step(self.models[name], self.frozen, batch, name)
                    loss = out.loss.detach().float()
                    loss_sum[name] += loss
                    loss_bad[name] |= ~torch.isfinite(loss)
                    part.engine.backward(out.loss)
                    if boundary:
                        self._finish(name, part, loss_bad[name], outcome)
                    else:
                        part.engine.step()
                if want_metrics:
                    self._collect(outcome.metrics, name, out.metrics)
        outcome.losses = {name: s / self.accum for name, s in loss_sum.items()}
        return outcome

    def _finish(self, name: str, part: Part, loss_bad: torch.Tensor, outcome: StepOutcome) -> None:
        """Collective skip decision for `part`, then its boundary engine.step()."""
        grad_bad = None if self.fp16 else _zero0_grads_bad(part, self.clip)
        flags = torch.stack([loss_bad, grad_bad if grad_bad is not None else torch.zeros_like(loss_bad)])
        flags = self.dist.all_reduce_tensor(flags.to(torch.float32), op="max")
        skip = bool(flags.any().item())
        part.gate.skip = skip
        try:
            part.engine.step()
        finally:
            part.gate.skip = False
        applied = not skip and bool(part.engine.was_step_applied())
        outcome.applied[name] = applied
        if skip or (not applied and not self.fp16):
            outcome.nonfinite = True
        elif not applied:
            outcome.overflow = True
        elif not self.fp16:
            norm = part.engine.get_global_grad_norm()
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)).item():
                outcome.suspect = True

    def _collect(self, sums: MetricSums, name: str, metrics: Mapping[str, Any]) -> None:
        prefix = "" if len(self.parts) == 1 else f"{name}/"
        for key, value in metrics.items():
            number = float(value.detach().float().mean().item()) if isinstance(value, torch.Tensor) else float(value)
            sums.add(prefix + key, number)
