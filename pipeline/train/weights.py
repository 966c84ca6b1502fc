"""Checkpoint -> full weights: the one place for consolidation and strict loading.

Export (``python -m pipeline export``), ``ckpt.init_from``, and frozen helpers named by a run dir (an autoencoder
run feeding a latent U-Net stage, ...) all read trained weights through here, in one CPU process without
torch.distributed:

1. :func:`resolve_checkpoint` finds a complete checkpoint (``latest`` or a named one) of a run dir;
2. :func:`consolidated_weights` reassembles full fp32 weights of one trainable part at any ZeRO stage and world
   size (DeepSpeed's ``zero_to_fp32`` for ZeRO 1-3, the module state at ZeRO-0) and overlays the EMA;
3. :func:`load_strict` loads them with no missing, unexpected or mis-shaped key;
4. :func:`restore_stage` does all of it for a run: rebuilds the stage from the resolved config stored *in the
   checkpoint* (not from today's YAML) and returns its modules with the trained weights.
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

from pipeline.errors import CheckpointError


def resolve_checkpoint(path: Path, name: str = "latest") -> Path:
    """A complete checkpoint directory from a run dir (+ checkpoint name) or from a checkpoint dir itself."""
    from pipeline.train.checkpoint import find_latest
    from pipeline.train.manifest import MANIFEST

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
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.train.checkpoint import DS_TAG, read_trainer_json
    from pipeline.train.ema import read_full_ema

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


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with shape checks, as a CheckpointError naming the keys on mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)} in the checkpoint, "
                                  f"{tuple(own[key].shape)} in the model")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


@dataclass
class Restored:
    """A run's stage rebuilt from its checkpoint, with the trained (EMA when chosen) weights in eval mode."""

    stage: Any  # pipeline.stages.base.Stage
    modules: dict[str, nn.Module]
    ckpt: Path
    meta: dict[str, Any]
    ema: bool


def restore_stage(run_dir: Path, checkpoint: str = "latest", use_ema: bool = True) -> Restored:
    """Verify a run's checkpoint and rebuild its stage (from the config stored in the checkpoint) with every
    trainable part strictly loaded. Leaves the caller's RNG streams untouched."""
    from pipeline.config import config_from_text
    from pipeline.stages.base import StageContext
    from pipeline.stages.registry import stage_class
    from pipeline.train.checkpoint import CONFIG_YAML, read_trainer_json
    from pipeline.train.manifest import verify_checkpoint
    from pipeline.train.rng import isolated, seed_all

    ckpt = resolve_checkpoint(Path(run_dir), checkpoint)
    verify_checkpoint(ckpt)
    meta = read_trainer_json(ckpt)
    cfg = config_from_text((ckpt / CONFIG_YAML).read_text(encoding="utf-8"), source=str(ckpt / CONFIG_YAML))
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


def load_diffusers_strict(cls: type, folder: Path) -> nn.Module:
    """A diffusers model class built from `folder`'s config.json with its safetensors weights loaded strictly.

    diffusers' own ``from_pretrained`` initialises missing keys at random with a warning; a component whose
    config does not match its weights must fail instead (one line naming the folder and the keys)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or len(weights) != 1:
        raise CheckpointError(f"{folder}: expected config.json and one *.safetensors file (a diffusers folder)")
    try:
        model = cls.from_config(cls.load_config(str(folder)))
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{folder}/config.json: not a valid {cls.__name__} config ({exc})") from None
    load_strict(model, load_file(str(weights[0])), str(folder))
    return model.eval()
