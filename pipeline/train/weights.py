"""Checkpoint -> full weights: the one place for consolidation and strict loading.

Export (``python -m pipeline export``), ``ckpt.init_from``, and frozen helpers named by a run dir (an autoencoder
run feeding a latent U-Net stage, ...) all read trained weights through here, in one CPU process without
torch.distributed:

1. :func:`resolve_checkpoint` finds a complete checkpoint (``latest`` or a named one) of a run dir;
2. :func:`consolidated_weights` reassembles full fp32 weights of one trainable part at any ZeRO stage and world
   size (DeepSpeed's ``zero_to_fp32`` for ZeRO 1-3, the module state at ZeRO-0) and overlays the EMA;
3. :func:`pipeline.models.loading.load_strict` loads them with no missing, unexpected or mis-shaped key;
4. :func:`restore_stage` does all of it for a run: rebuilds the stage from the resolved config stored *in the
   checkpoint* (:func:`checkpoint_config`, not today's YAML) and returns its modules with the trained weights.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Config, config_from_text
from pipeline.errors import CheckpointError
from pipeline.models.loading import load_strict
from pipeline.registry import stage_class
from pipeline.train.checkpoint import CONFIG_YAML, DS_TAG, find_latest, read_trainer_json
from pipeline.train.ema import read_full_ema
from pipeline.manifest import MANIFEST, verify_checkpoint
from pipeline.train.rng import isolated, seed_all
from pipeline.train.stage import Stage, StageContext


def resolve_checkpoint(path: Path, name: str = "latest") -> Path:
    """A complete checkpoint directory from a run dir (+ checkpoint name) or from a checkpoint dir itself."""
    path = Path(path)
    if (path / MANIFEST).is_file() and name == "latest":
        return path
    root = path / "checkpoints"
    if name == "latest":
        found = find_latest(root)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint (expected {root}/latest naming a checkpoint "
                                  "with a MANIFEST.json; has the run saved one yet?)")
        return found
    candidate = root / name
    if not (candidate / MANIFEST).is_file():
        raise CheckpointError(f"{candidate}: not a complete checkpoint (missing or without MANIFEST.json)")
    return candidate


def _zero0_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    path = tag_dir / "mp_rank_00_model_states.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable is unreadable, whatever the unpickler says
        raise CheckpointError(f"{path}: cannot read DeepSpeed module state ({exc})") from None
    module = state.get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: no 'module' state dict inside")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def consolidated_weights(ckpt: Path, part: str, use_ema: bool) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of one trainable part of checkpoint `ckpt`, EMA applied when present and wanted."""
    # deepspeed is imported where it is needed, as everywhere in the package: importing it costs seconds and logs
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    meta = read_trainer_json(ckpt)
    if part not in meta["parts"]:
        raise CheckpointError(f"{ckpt}: has parts {meta['parts']}, not {part!r}")
    if meta["zero_stage"] == 0:
        state = _zero0_weights(ckpt / part / DS_TAG)
    else:
        # zero_to_fp32 prints progress lines and bars
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt / part), tag=DS_TAG))
        if meta["zero_stage"] in (1, 2):
            # zero_to_fp32 rebuilds what the optimizer partitions hold (+ buffers); at ZeRO-1 it leaves out frozen
            # parameters (e.g. the prior's clip_mean/clip_std). ZeRO 1-2 keep the full module state beside them.
            for key, value in _zero0_weights(ckpt / part / DS_TAG).items():
                state.setdefault(key, value)
    if use_ema:
        ema = read_full_ema(ckpt, part)
        if ema is not None:
            unknown = sorted(set(ema) - set(state))
            if unknown:
                raise CheckpointError(f"{ckpt}: EMA of part {part!r} has parameters the weights lack: {unknown[:5]}")
            state.update(ema)
    return state


def checkpoint_config(path: Path, name: str = "latest") -> tuple[Path, Config]:
    """(checkpoint dir, the resolved run config stored in it) of a run dir or checkpoint dir: what the run was
    trained with, not today's YAML."""
    ckpt = resolve_checkpoint(Path(path), name)
    return ckpt, config_from_text((ckpt / CONFIG_YAML).read_text(encoding="utf-8"), source=str(ckpt / CONFIG_YAML))


@dataclass
class Restored:
    """A run's stage rebuilt from its checkpoint, with the trained (EMA when chosen) weights in eval mode."""

    stage: Stage
    modules: dict[str, nn.Module]
    ckpt: Path
    meta: dict[str, Any]
    ema: bool


def restore_stage(run_dir: Path, checkpoint: str = "latest", use_ema: bool = True) -> Restored:
    """Verify a run's checkpoint and rebuild its stage (from the config stored in the checkpoint) with every
    trainable part strictly loaded. Leaves the caller's RNG streams untouched."""
    ckpt, cfg = checkpoint_config(run_dir, checkpoint)
    verify_checkpoint(ckpt)
    meta = read_trainer_json(ckpt)
    ctx = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)
    stage = stage_class(cfg.stage)(cfg, ctx)
    with isolated():
        seed_all(cfg.train.seed)  # initial values are overwritten; seeding only keeps building deterministic
        modules = stage.build_trainable()
    if sorted(modules) != sorted(meta["parts"]):
        raise CheckpointError(f"{ckpt}: checkpoint parts {meta['parts']} differ from the stage's {sorted(modules)}")
    with_ema = use_ema and bool(meta.get("ema"))
    for name, module in modules.items():
        load_strict(module, consolidated_weights(ckpt, name, with_ema), f"{ckpt} part {name!r}")
        module.eval()
    return Restored(stage, modules, ckpt, meta, with_ema)
