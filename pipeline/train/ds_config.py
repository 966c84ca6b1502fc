"""Precision resolution and the DeepSpeed JSON generated from our typed config.

The generated config is the single source of DeepSpeed settings; an expert may merge a JSON file over it
(``dist.deepspeed_config``). Keys that our typed config owns (batch sizes, accumulation, clipping, precision,
ZeRO stage) are checked after the merge so that a user JSON cannot silently disagree with the run config that
the Trainer, the data loader and the checkpoint rely on.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.config import Config, TrainConfig
from pipeline.errors import ConfigError

PrecisionName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Never let DeepSpeed print its own per-step progress lines: rank 0 logs through our metrics sinks.
NO_PRINT = 2**31 - 1


@dataclass(frozen=True)
class Precision:
    """The resolved compute precision: `name` for configs/messages, `dtype` for modules and stages."""

    name: PrecisionName
    dtype: torch.dtype


def resolve_precision(train: TrainConfig, device: torch.device) -> Precision:
    """'auto' is bf16 on a GPU that supports it and fp32 on CPU; explicit names are taken as given."""
    name = train.precision
    if name == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bf16" if gpu_bf16 else "fp32"
    return Precision(name, DTYPES[name])


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in: nested dicts merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def trainer_clips_gradients(cfg: Config, precision: Precision) -> bool:
    """At ZeRO-0 in fp32 the Trainer clips (DeepSpeed's fp32 clipping multiplies every gradient by a (1,)-shaped
    tensor in place, which fails for 0-dim parameters such as CLIP's logit_scale); DeepSpeed clips otherwise."""
    return cfg.dist.zero_stage == 0 and precision.name == "fp32" and cfg.optim.grad_clip > 0


def generated_config(cfg: Config, precision: Precision, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config our typed config implies (before any user JSON is merged over it)."""
    zero: dict[str, Any] = {"stage": cfg.dist.zero_stage}
    if cfg.dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": 0.0 if trainer_clips_gradients(cfg, precision) else cfg.optim.grad_clip,
        "steps_per_print": NO_PRINT,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "bf16": {"enabled": precision.name == "bf16"},
        # Dynamic loss scaling for fp16: DeepSpeed skips overflowing steps and lowers the scale itself.
        "fp16": {"enabled": precision.name == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    }
    return ds


def _read_user_json(path: str) -> dict:
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"dist.deepspeed_config: cannot read {path} ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"dist.deepspeed_config: {path} is not valid JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"dist.deepspeed_config: {path} must hold a JSON object")
    return loaded


# Keys whose value the Trainer depends on: a user JSON may repeat them only with the same value.
OWNED = {
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum_steps",
    ("zero_optimization", "stage"): "dist.zero_stage",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "train.precision",
}
FORBIDDEN = ("optimizer", "scheduler", "train_batch_size", "gradient_clipping")


def _lookup(tree: dict, path: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def build_deepspeed_config(cfg: Config, precision: Precision, device: torch.device) -> dict[str, Any]:
    """Generated config with ``dist.deepspeed_config`` (if any) deep-merged over it, then validated."""
    generated = generated_config(cfg, precision, device)
    if not cfg.dist.deepspeed_config:
        return generated
    user = _read_user_json(cfg.dist.deepspeed_config)
    for key in FORBIDDEN:
        if key in user:
            raise ConfigError(f"dist.deepspeed_config: {cfg.dist.deepspeed_config} sets {key!r}, which the run "
                              "config owns (optim.* for the optimizer, LR schedule and clipping, train.* for batch "
                              "sizes)")
    merged = deep_merge(generated, user)
    for path, owner in OWNED.items():
        if _lookup(merged, path) != _lookup(generated, path):
            raise ConfigError(f"dist.deepspeed_config: {'.'.join(path)}={_lookup(merged, path)!r} disagrees with "
                              f"{owner} in the run config; set it there instead")
    return merged
