"""Strict loading of weights into library modules: no missing, unexpected or mis-shaped key is ever accepted.

Checkpoint consolidation (pipeline/train/weights.py), exported bundle components (the sampler, frozen helpers) and
``ckpt.init_from`` all load through these two functions; diffusers' own ``from_pretrained`` initialises missing keys
at random with a warning, which would silently ship a half-random network.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.errors import CheckpointError


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


def load_diffusers_strict(cls: type, folder: Path) -> nn.Module:
    """A diffusers model class built from `folder`'s config.json with its safetensors weights loaded strictly
    (a component whose config does not match its weights fails with one line naming the folder and the keys)."""
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
