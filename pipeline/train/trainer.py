"""The one training loop, for every stage.

Per optimizer step: accumulate micro-batches through every trainable part (dict order = step order), update
or collectively skip each part (see :mod:`pipeline.train.step`), update the EMA of applied parts, then at
step boundaries: roll back after a streak of non-finite steps, log / evaluate / sample, checkpoint, and
stop when every rank agrees that a stop signal arrived. All ranks execute the same sequence of collectives.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, dump_config, save_config
from pipeline.data.spec import normalize_batch
from pipeline.errors import PipelineError
from pipeline.train import rng
from pipeline.train.backend import Dist
from pipeline.train.checkpoint import Checkpointer, Restored, find_latest, resolve_resume
from pipeline.train.ds_config import resolve_precision
from pipeline.train.metrics import MetricsSinks, max_memory_bytes
from pipeline.train.schedule import lr_at
from pipeline.train.setup import DataSources, build_stage, build_training, open_inputs, run_fingerprint
from pipeline.train.signals import StopRequest
from pipeline.train.stage import MetricSums
from pipeline.train.step import StepOutcome

log = logging.getLogger(__name__)


class TrainingError(PipelineError):
    """Training cannot continue meaningfully (e.g. non-finite steps that a rollback cannot cure)."""


@dataclass
class Counters:
    """Cumulative fault counters (saved in checkpoints, logged under 'skipped')."""

    nonfinite_steps: int = 0
    overflow_steps: int = 0
    rollbacks: int = 0


class Trainer:
    """Drives one stage on this rank. Construct inside :func:`pipeline.train.backend.process_group`."""

    def __init__(self, cfg: Config, run_dir: Path, dist: Dist, stop: StopRequest, sources: DataSources) -> None:
        self.cfg, self.run_dir, self.dist, self.stop, self.sources = cfg, run_dir, dist, stop, sources
        self.precision = resolve_precision(cfg.train, dist.device)
        resume_from = self._agreed_checkpoint(resolve_resume(run_dir, cfg.ckpt.resume))  # refuse before building
        self.stage = build_stage(cfg, dist, self.precision, run_dir)
        self.spec = self.stage.sample_spec()
        inputs = open_inputs(cfg, self.stage, self.spec, sources, dist)  # every path checked before the models
        self.loader, self.eval_loader = inputs.train, inputs.eval
        training = build_training(cfg, dist, self.precision, self.stage, self.spec)
        built, self.runner = training.built, training.runner
        self.parts, self.frozen, self.emas = built.parts, built.frozen, built.emas
        self.checkpointer = Checkpointer(run_dir, dist, self.parts, self.emas,
                                         run_fingerprint(cfg, dist, self.precision, built), dump_config(cfg),
                                         cfg.ckpt.keep_last)
        self.counters = Counters()
        self.step = 0
        self.streak = 0
        self.rolled_back_to: set[str] = set()
        self.last_saved = -1
        if resume_from is not None:
            self._apply(self.checkpointer.load(resume_from), resume=True)
        else:
            self.batches = iter(self.loader)
        if dist.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        self.sinks = MetricsSinks(run_dir, cfg.log, dist.rank == 0, self.step, cfg.train.max_steps)
        self._reset_window()

    # ------------------------------------------------------------------------------------------ state
    def _agreed_checkpoint(self, path: Path | None) -> Path | None:
        """Every rank resolves the checkpoint itself; they must agree (RUN_DIR on a shared filesystem)."""
        names = self.dist.gather_objects(None if path is None else str(path))
        if len(set(names)) != 1:
            raise PipelineError(f"ranks see different checkpoints {sorted(set(map(str, names)))}; RUN_DIR must be "
                                "on a filesystem shared by all ranks")
        return path

    def _apply(self, restored: Restored, resume: bool) -> None:
        """Continue from a loaded checkpoint: data position, then RNG last (nothing may draw after it)."""
        self.step = restored.step
        self.last_saved = restored.step
        if resume:
            self.counters = Counters(**{k: int(restored.counters.get(k, 0)) for k in asdict(Counters())})
        self.loader.load_state_dict(restored.data)
        with rng.isolated():
            self.batches = iter(self.loader)
        rng.restore(restored.rng)
        self.streak = 0
        if self.dist.rank == 0:
            log.info("%s from %s (step %d)", "resumed" if resume else "rolled back", restored.path, restored.step)

    def _save(self) -> None:
        start = time.perf_counter()
        self.checkpointer.save(self.step, asdict(self.counters), self.loader.state_dict())
        self.last_saved = self.step
        self.excluded_s += time.perf_counter() - start

    def _rollback(self, reason: str) -> None:
        target = self._agreed_checkpoint(find_latest(self.run_dir / "checkpoints"))
        if target is None:
            raise TrainingError(f"{reason} at step {self.step} and no checkpoint to roll back to; lower optim.lr, "
                                "check the data, or checkpoint more often (ckpt.every_steps)")
        if target.name in self.rolled_back_to:
            raise TrainingError(f"{reason} at step {self.step} again after rolling back to {target}; the failure is "
                                "reproducible from that state: lower optim.lr or check the data")
        self.rolled_back_to.add(target.name)
        self._apply(self.checkpointer.load(target), resume=False)
        self.counters.rollbacks += 1
        self.sinks.truncate(self.step)
        self._reset_window()

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> int:
        """Train until train.max_steps (exit code 0) or an agreed stop signal (ckpt.preempt_exit_code).

        A collective that fails inside DeepSpeed (a peer died, or stalled past dist.timeout_s) ends the run with a
        CollectiveError naming the step instead of a library traceback.
        """
        try:
            return self._loop()
        except RuntimeError as exc:
            translated = self.dist.translate(exc, f"training step {self.step + 1}")
            if translated is exc:
                raise
            raise translated from exc

    def _loop(self) -> int:
        cfg = self.cfg
        while self.step < cfg.train.max_steps:
            step = self.step + 1
            observe = self._observes(step)
            outcome = self.runner.run(self.batches, lr_at(step, cfg.optim, cfg.train.max_steps), observe)
            self.step = step
            self._account(outcome)
            if outcome.suspect or (cfg.train.max_nonfinite_streak and self.streak >= cfg.train.max_nonfinite_streak):
                self._rollback("updates with a non-finite gradient norm" if outcome.suspect else
                               f"{self.streak} consecutive non-finite steps (train.max_nonfinite_streak)")
                continue
            if observe:
                self._observe(step, outcome)
            stopping = self._stop_agreed()
            if step % cfg.ckpt.every_steps == 0 or step == cfg.train.max_steps or stopping:
                self._save()
            self.sinks.advance(step)
            if stopping:
                if self.dist.rank == 0:
                    log.warning("stop signal received: checkpointed step %d, exiting", step)
                return cfg.ckpt.preempt_exit_code
        if self.last_saved != self.step:  # resumed at (or past) max_steps without a final checkpoint
            self._save()
        return 0

    def _account(self, outcome: StepOutcome) -> None:
        for name, applied in outcome.applied.items():
            if applied and name in self.emas:
                self.emas[name].update()
        self.counters.nonfinite_steps += int(outcome.nonfinite)
        self.counters.overflow_steps += int(outcome.overflow)
        self.streak = self.streak + 1 if outcome.nonfinite else 0
        self.window_steps += 1
        self.window_wait_s += outcome.data_wait_s
        if outcome.nonfinite and self.dist.rank == 0:
            log.warning("step %d: non-finite loss or gradients; update skipped (streak %d)", self.step, self.streak)

    def _stop_agreed(self) -> bool:
        return self.dist.all_reduce([1.0 if self.stop.requested else 0.0], op="max")[0] > 0

    # ---------------------------------------------------------------------------------- observability
    def _due(self, step: int, every: int) -> bool:
        return every > 0 and (step % every == 0 or step == self.cfg.train.max_steps)

    def _eval_due(self, step: int) -> bool:
        return bool(self.cfg.data.eval_urls) and self._due(step, self.cfg.eval.every_steps)

    def _observes(self, step: int) -> bool:
        return (self._due(step, self.cfg.train.log_every) or self._eval_due(step)
                or self._due(step, self.cfg.train.sample_every))

    def _reset_window(self) -> None:
        self.window_start = time.perf_counter()
        self.window_steps, self.window_wait_s, self.excluded_s = 0, 0.0, 0.0

    def _observe(self, step: int, outcome: StepOutcome) -> None:
        """One metrics record for this step: training figures (+ eval), rank 0 writes; all ranks take part."""
        wall = max(time.perf_counter() - self.window_start - self.excluded_s, 1e-9)
        local = {"losses": {k: float(v.item()) for k, v in outcome.losses.items()}, "metrics": outcome.metrics.sums(),
                 "wait_frac": min(self.window_wait_s / wall, 1.0), "skips": self.loader.skip_counts(),
                 "memory": max_memory_bytes(self.dist.device)}
        everyone = self.dist.gather_objects(local)
        record = self._record(step, everyone, wall)
        if self._eval_due(step):
            record.update(self._evaluate())
        if self._due(step, self.cfg.train.sample_every):
            self._sample(step)
        self.sinks.write(record)
        self._reset_window()  # evaluation and sampling time is not training throughput

    def _record(self, step: int, everyone: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        first = next(iter(self.parts))
        n = len(everyone)
        losses = {k: sum(e["losses"][k] for e in everyone) / n for k in everyone[0]["losses"]}
        skipped: dict[str, int] = {}
        for e in everyone:
            for reason, count in e["skips"].items():
                skipped[reason] = skipped.get(reason, 0) + int(count)
        skipped.update(nonfinite_steps=self.counters.nonfinite_steps, overflow_steps=self.counters.overflow_steps)
        samples = self.window_steps * self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps * n
        record: dict[str, Any] = {
            "step": step, "loss": losses[first], "lr": lr_at(step, self.cfg.optim, self.cfg.train.max_steps),
            "samples_per_sec": samples / wall, "data_wait_frac": sum(e["wait_frac"] for e in everyone) / n,
            "skipped": skipped, "rollbacks": self.counters.rollbacks,
            "max_memory_bytes": max(e["memory"] for e in everyone)}
        if len(losses) > 1:
            record.update({f"loss/{k}": v for k, v in losses.items()})
        totals = MetricSums()
        for e in everyone:
            totals.merge(e["metrics"])
        record.update({k: v for k, v in totals.means().items() if k not in record})
        return record

    @contextmanager
    def _inference_models(self) -> Iterator[dict[str, torch.nn.Module]]:
        """The parts' plain modules in eval mode with their EMA weights applied (when train.ema_decay > 0), for
        evaluation and sample grids, which never go through an engine; training weights and mode restored after.
        Entered by every rank (applying a ZeRO-3 EMA is collective)."""
        for part in self.parts.values():
            part.module.eval()
        try:
            with ExitStack() as stack:
                for ema in self.emas.values():
                    stack.enter_context(ema.applied())
                yield {name: part.module for name, part in self.parts.items()}
        finally:
            for part in self.parts.values():
                part.module.train()

    def _evaluate(self) -> dict[str, float]:
        """stage.evaluate on this rank's share; (sum, count) pairs reduced over ranks into means."""
        assert self.eval_loader is not None  # built at start-up whenever data.eval_urls is set
        batches = (normalize_batch(b, self.spec, self.dist.device, self.precision.dtype)
                   for b in self._lockstep(self.eval_loader))
        with self._inference_models() as models, rng.isolated(), torch.no_grad():
            sums = self.stage.evaluate(models, self.frozen, batches)
        totals = MetricSums()
        for share in self.dist.gather_objects({k: (float(s), float(c)) for k, (s, c) in sums.items()}):
            totals.merge(share)
        return totals.means(prefix="eval/")

    def _lockstep(self, batches: Iterable[dict]) -> Iterator[dict]:
        """Yield batches only while every rank still has one.

        Eval shares can differ by a batch between ranks (uneven sample counts, skipped bad samples), and under
        ZeRO-3 every forward pass gathers parameters collectively: a rank with one more batch than its peers
        would wait for them forever. One small all-reduce per batch keeps the ranks in step; the few samples a
        rank holds beyond the shortest share are left out of that evaluation.
        """
        iterator = iter(batches)
        try:
            while True:
                batch = next(iterator, None)
                if self.dist.all_reduce([1.0 if batch is None else 0.0], op="max")[0] > 0:
                    return
                yield batch
        finally:
            closer = getattr(iterator, "close", None)
            if callable(closer):  # a consumer that stops early (the sample grid) also stops the eval workers
                closer()

    def _sample(self, step: int) -> None:
        """All ranks run the stage's sampler (ZeRO-3 gathers are collective) on their first held-out batch (None
        without data.eval_urls); rank 0 saves the grid."""
        batch = None
        if self.eval_loader is not None:
            held_out = self._lockstep(self.eval_loader)
            batch = next(held_out, None)
            held_out.close()
        if batch is not None:
            batch = normalize_batch(batch, self.spec, self.dist.device, self.precision.dtype)
        with self._inference_models() as models, rng.isolated(), torch.no_grad():
            images = self.stage.sample_images(models, self.frozen, seed=self.cfg.train.seed, batch=batch)
        if images is not None:
            self.sinks.images(step, images)

    def close(self) -> None:
        self.sinks.close()
        closer = getattr(self.loader, "close", None)
        if callable(closer):
            closer()
