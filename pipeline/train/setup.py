"""Building what the Trainer drives: the stage, its frozen helpers, one engine per trainable part, EMA, loaders.

Kept apart from the loop so the loop reads as the loop. Loaders are built through :class:`DataSources` so the
real ``pipeline.data.loader`` builders are used by default and imported only when training starts.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Config, DataConfig, compile_shapes
from pipeline.data import loader as data_loader
from pipeline.data.buckets import resolve_shapes
from pipeline.data.sources import expand_shard_specs
from pipeline.data.spec import BatchLoader, SampleSpec
from pipeline.errors import CheckpointError, ConfigError, PipelineError
from pipeline.registry import stage_class
from pipeline.train.stage import Stage, StageContext
from pipeline.train.backend import Dist, Part, make_part
from pipeline.train import rng
from pipeline.train.ds_config import Precision, build_deepspeed_config, trainer_clips_gradients
from pipeline.train.ema import EMA
from pipeline.train.step import StepRunner
from pipeline.models.loading import load_strict
from pipeline.train.weights import consolidated_weights, resolve_checkpoint

log = logging.getLogger(__name__)

TrainLoaderBuilder = Callable[..., BatchLoader]
EvalLoaderBuilder = Callable[..., Iterable[dict]]


@dataclass(frozen=True)
class DataSources:
    """The loader builders, with exactly the signatures of ``pipeline.data.loader``::

        train(data: DataConfig, spec, *, batch_size, seed, rank, world_size) -> BatchLoader
        eval(data: DataConfig, spec, *, batch_size, max_samples, rank, world_size) -> Iterable[dict]
    """

    train: TrainLoaderBuilder
    eval: EvalLoaderBuilder


def default_data_sources() -> DataSources:
    return DataSources(train=data_loader.build_train_loader, eval=data_loader.build_eval_loader)


def build_stage(cfg: Config, dist: Dist, precision: Precision, run_dir: Path | None) -> Stage:
    ctx = StageContext(rank=dist.rank, world_size=dist.world_size, device=dist.device,
                       compute_dtype=precision.dtype, run_dir=run_dir)
    return stage_class(cfg.stage)(cfg, ctx)


def freeze(frozen: Mapping[str, nn.Module], device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Frozen helpers: eval mode, no gradients, compute dtype, on device; never seen by an optimizer."""
    out = {}
    for name, module in frozen.items():
        module.requires_grad_(False)
        out[name] = module.to(device=device, dtype=dtype).eval()
    return out


def init_checkpoint(source: str) -> Path:
    """The complete checkpoint ckpt.init_from names (a run dir or a checkpoint dir); one-line error otherwise."""
    path = Path(source)
    if (path / "bundle.json").is_file():
        raise PipelineError(f"ckpt.init_from={source}: initialising from an export bundle is not supported; point "
                            "it at a checkpoint (RUN_DIR or RUN_DIR/checkpoints/step_XXXXXXXX)")
    if not path.exists():
        raise CheckpointError(f"ckpt.init_from={source}: no such run or checkpoint directory")
    return resolve_checkpoint(path)


def load_initial_weights(trainable: Mapping[str, nn.Module], source: str) -> None:
    """ckpt.init_from: strict full-weight load of every part from a checkpoint (EMA weights when present)."""
    ckpt = init_checkpoint(source)
    for name, module in trainable.items():
        state = consolidated_weights(ckpt, name, use_ema=True)
        load_strict(module, state, f"{ckpt} part {name!r}")
    log.info("initialised weights from %s", ckpt)


@dataclass
class Built:
    """The trainable engines, frozen helpers and EMAs, freshly built (before any checkpoint is loaded)."""

    parts: dict[str, Part]
    frozen: dict[str, nn.Module]
    emas: dict[str, EMA]


@dataclass
class Inputs:
    """The run's data loaders, built (and so validated) before any model is."""

    train: BatchLoader
    eval: Iterable[dict] | None


def open_inputs(cfg: Config, stage: Stage, spec: SampleSpec, sources: DataSources, dist: Dist) -> Inputs:
    """Check every path the run will read before anything heavy happens, on every rank, with one-line errors.

    Shard specs (train, eval, precomputed), ckpt.init_from and the files the stage's model config names (T5,
    pretrained weights, frozen helpers): a wrong path fails in seconds instead of at the first evaluation or after
    the models are built. The loaders' builders validate their own specs and precomputed alignment; precomputed
    specs the stage does not read are still required to exist (a typo there is a typo).
    """
    for key, spec_value in (("data.precomputed_urls", cfg.data.precomputed_urls),
                            ("data.eval_precomputed_urls", cfg.data.eval_precomputed_urls)):
        if spec_value and not spec.precomputed:
            expand_shard_specs(spec_value, key)
    if cfg.ckpt.init_from:
        init_checkpoint(cfg.ckpt.init_from)
    for key, path in stage.input_paths().items():
        if not Path(path).exists():
            raise ConfigError(f"{key}: {path} does not exist (no such file or directory); fix the path")
    train = build_train_loader(sources, cfg.data, spec, cfg, dist)
    evaluation = None
    if cfg.data.eval_urls:
        evaluation = sources.eval(cfg.data, spec, batch_size=cfg.eval.batch_size, max_samples=cfg.eval.max_samples,
                                  rank=dist.rank, world_size=dist.world_size)
    return Inputs(train, evaluation)


def build_all(cfg: Config, dist: Dist, precision: Precision, stage: Stage) -> Built:
    """Frozen helpers and engines for `stage`; every rank builds identical initial weights (same seed)."""
    trainable = stage.build_trainable()
    if not trainable:
        raise PipelineError(f"stage {cfg.stage!r} declares no trainable parts")
    if cfg.ckpt.init_from:
        load_initial_weights(trainable, cfg.ckpt.init_from)
    for module in trainable.values():
        apply_fast_path(module, cfg, dist.device)
    frozen = freeze(stage.build_frozen(), dist.device, precision.dtype)
    ds_config = build_deepspeed_config(cfg, precision, dist.device)
    parts = {name: make_part(name, module, cfg, ds_config) for name, module in trainable.items()}
    emas = {name: EMA(part.module, cfg.train.ema_decay) for name, part in parts.items()} \
        if cfg.train.ema_decay > 0 else {}
    return Built(parts, frozen, emas)


@dataclass
class Training:
    """What one rank trains: the built parts, frozen helpers and EMAs, and the step runner over them."""

    built: Built
    runner: StepRunner


def build_training(cfg: Config, dist: Dist, precision: Precision, stage: Stage, spec: SampleSpec) -> Training:
    """:func:`build_all` and the :class:`StepRunner`, exactly as the Trainer trains (and the benchmarks measure):
    every rank builds identical initial weights from train.seed, then draws noise and dropout from a rank-distinct
    seed."""
    rng.seed_all(cfg.train.seed)
    built = build_all(cfg, dist, precision, stage)
    rng.seed_all(rng.rank_seed(cfg.train.seed, dist.rank))
    clip = cfg.optim.grad_clip if trainer_clips_gradients(cfg, precision) else 0.0
    runner = StepRunner(stage, spec, built.parts, built.frozen, dist, precision.dtype, cfg.train.grad_accum_steps,
                        fp16=precision.name == "fp16", clip=clip)
    return Training(built, runner)


def switched_on(setting: str, device: torch.device) -> bool:
    """An 'auto' | 'on' | 'off' speed switch: 'auto' means on with CUDA."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def apply_fast_path(module: nn.Module, cfg: Config, device: torch.device) -> None:
    """train.compile on one trainable network, in place (state dict keys unchanged).

    No channels-last weights: DeepSpeed's initial broadcast views every parameter as bytes (refused for a
    channels-last tensor) and its flat bf16 / ZeRO-1/2 buffers re-create parameters as contiguous views anyway.
    """
    if switched_on(cfg.train.compile, device):
        if cfg.dist.zero_stage == 3:
            log.warning("train.compile: left eager under ZeRO-3 (its parameter hooks break graph capture)")
            return
        module.compile(backend=cfg.train.compile_backend, **compile_shape_options(cfg))


def compile_shape_options(cfg: Config) -> dict[str, Any]:
    """torch.compile options for train.compile_shapes (see its doc). Bucketed batches change shape from one
    micro-batch to the next: by default torch compiles a static graph for the first bucket and a dynamic one at the
    first change (two compiles of a large network); with dynamic=False and its default recompile limit (8) it would
    run every bucket after the eighth compile eagerly. 'dynamic' passes nothing here: the U-Net stage marks its
    sample's height and width dynamic at each call (unet_forward's dynamic_size), which keeps every other size
    static; torch.compile(dynamic=True) would make all of them symbolic, and a feature width equal to an image
    side (32 and 32) then ties the two and specialises the side back to a constant (seen on the demo config)."""
    policy = compile_shapes(cfg)
    if policy != "static":
        return {}
    shapes = len(resolve_shapes(cfg.data.buckets, cfg.data.resolution)) if cfg.data.buckets.enabled else 1
    import torch._dynamo.config as dynamo_config  # torch.compile's recompile limit lives only there

    # a training and an evaluation (no_grad) graph per shape, and a few for the square evaluation batches
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), 2 * shapes + 4))
    return {"dynamic": False}


def build_train_loader(sources: DataSources, data: DataConfig, spec: SampleSpec, cfg: Config,
                       dist: Dist) -> BatchLoader:
    return sources.train(data, spec, batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                         rank=dist.rank, world_size=dist.world_size)


def run_fingerprint(cfg: Config, dist: Dist, precision: Precision, built: Built) -> dict[str, Any]:
    """What must not change between a checkpoint and the run that resumes from it (stored in trainer.json)."""
    return {"world_size": dist.world_size, "zero_stage": cfg.dist.zero_stage, "precision": precision.name,
            "parts": list(built.parts), "stage": cfg.stage, "ema": bool(built.emas)}
