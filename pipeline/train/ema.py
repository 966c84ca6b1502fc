"""Exponential moving average of one part's trainable weights, correct under every ZeRO stage.

Design (ZeRO-3): each rank keeps the EMA of *its own partition* of every parameter (``param.ds_tensor``, the
flat 1-D shard ZeRO-3 owns, zero-padded on the last rank) instead of gathering full parameters every step.
Outside the forward pass a ZeRO-3 parameter's ``.data`` is an empty placeholder, so averaging ``.data`` would
silently average nothing; averaging ``ds_tensor`` costs no communication and 1/world of the memory, and each
element's EMA is the same arithmetic as without ZeRO, so the consolidated result equals an EMA computed on full
weights (tested bit for bit). Each rank saves its shard; :func:`consolidate` concatenates the shards in rank
order and strips the padding, exactly like DeepSpeed's zero_to_fp32 does for weights.

ZeRO 0-2 replicate full parameters on every rank, so the EMA is replicated too and rank 0 saves it.

The EMA is kept in fp32 whatever the compute dtype (an EMA of bf16 values in bf16 would lose most updates); it
averages the module's weights as the forward pass sees them (in bf16 runs: the bf16 copies of the fp32 masters).
It is updated only after steps whose update was applied (a skipped step changes no weight, so neither the EMA).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import CheckpointError


def _local_view(param: nn.Parameter) -> torch.Tensor:
    """The values this rank owns: the ZeRO-3 partition (1-D) or the full parameter."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    """fp32 shadow copies of a part's trainable parameters (or of this rank's ZeRO-3 partitions)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params)
        # ds_shape is the full shape of a ZeRO-3 parameter (p.shape is the placeholder's).
        self.full_shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in named}
        self.shadow = [_local_view(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- shadow + (1 - decay) * (weight - shadow), element-wise (same op with or without ZeRO)."""
        current = [_local_view(p).detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the module for the duration (evaluation, sample grids); the exact trained weights
        afterwards. Collective under ZeRO-3 (persistent parameters are re-gathered): every rank must enter."""
        views = [_local_view(p) for p in self.params]
        backup = [v.detach().clone() for v in views]
        self._write(views, self.shadow)
        try:
            yield
        finally:
            self._write(views, backup)

    def _write(self, views: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for view, value in zip(views, values):
                view.copy_(value)
        partitioned = [p for p in self.params if hasattr(p, "ds_tensor")]
        if partitioned:
            _refresh_gathered(partitioned)

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's shadow tensors by parameter name (CPU, contiguous: ready for safetensors)."""
        return {n: t.detach().cpu().contiguous() for n, t in zip(self.names, self.shadow)}

    def load_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Strict: exactly the same names and shapes, or CheckpointError naming `source`."""
        missing = sorted(set(self.names) - set(state))
        unexpected = sorted(set(state) - set(self.names))
        if missing or unexpected:
            raise CheckpointError(f"{source}: EMA keys do not match the model (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
        for i, name in enumerate(self.names):
            if tuple(state[name].shape) != tuple(self.shadow[i].shape):
                raise CheckpointError(f"{source}: EMA tensor {name!r} has shape {tuple(state[name].shape)}, "
                                      f"the model needs {tuple(self.shadow[i].shape)}")
            self.shadow[i].copy_(state[name].to(self.shadow[i].device, torch.float32))


def _refresh_gathered(params: list[nn.Parameter]) -> None:
    """After ZeRO-3 partitions were overwritten: drop gathered copies that are now stale and re-gather the small
    ("persistent") parameters, which ZeRO-3 keeps gathered in .data between forwards and otherwise refreshes only
    after an optimizer step (its _post_step does the same). Collective: every rank calls it."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    available = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    if available:
        available[0].partition(available)  # frees .data only: the partition (just written) is kept as it is
    persistent = [p for p in params if p.ds_persist]
    if persistent:
        persistent[0].all_gather(persistent)


def ema_filename(part: str, rank: int | None) -> str:
    """ema_PART.safetensors (replicated, written by rank 0) or ema_PART_rankRRRRR.safetensors (ZeRO-3 shard)."""
    return f"ema_{part}.safetensors" if rank is None else f"ema_{part}_rank{rank:05d}.safetensors"


def save_ema(ema: EMA, part: str, ckpt_dir: Path, rank: int, world_size: int) -> None:
    """Rank 0 writes a replicated EMA; every rank writes its shard of a partitioned one."""
    if not ema.partitioned and rank != 0:
        return
    meta = {"partitioned": json.dumps(ema.partitioned), "world_size": str(world_size),
            "full_shapes": json.dumps(ema.full_shapes)}
    name = ema_filename(part, rank if ema.partitioned else None)
    save_file(ema.state(), str(ckpt_dir / name), metadata=meta)


def load_ema(ema: EMA, part: str, ckpt_dir: Path, rank: int) -> None:
    """Restore this rank's EMA from `ckpt_dir` (shard or replicated copy) strictly."""
    path = ckpt_dir / ema_filename(part, rank if ema.partitioned else None)
    if not path.is_file():
        raise CheckpointError(f"{path}: EMA file missing (was the checkpoint written with another ZeRO stage "
                              "or without train.ema_decay?)")
    ema.load_state(load_file(str(path)), str(path))


def read_full_ema(ckpt_dir: Path, part: str) -> dict[str, torch.Tensor] | None:
    """The consolidated full fp32 EMA of `part` from a checkpoint (any ZeRO stage), or None if it has none."""
    replicated = ckpt_dir / ema_filename(part, None)
    if replicated.is_file():
        return load_file(str(replicated))
    shards = sorted(ckpt_dir.glob(f"ema_{part}_rank*.safetensors"))
    if not shards:
        return None
    return consolidate([load_file(str(p)) for p in shards], _full_shapes(shards[0]), str(ckpt_dir))


def _full_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "full_shapes" not in meta:
        raise CheckpointError(f"{path}: EMA shard without 'full_shapes' metadata")
    return json.loads(meta["full_shapes"])


def consolidate(shards: list[Mapping[str, torch.Tensor]], full_shapes: Mapping[str, list[int]],
                source: str) -> dict[str, torch.Tensor]:
    """Full tensors from ZeRO-3 shards (rank order): concatenate each name's 1-D shards, drop the padding."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in full_shapes.items():
        pieces = [s.get(name) for s in shards]
        if any(p is None for p in pieces):
            raise CheckpointError(f"{source}: EMA shard of {name!r} missing on some rank")
        numel = math.prod(shape)
        flat = torch.cat([p.reshape(-1) for p in pieces])  # type: ignore[union-attr]
        if flat.numel() < numel:
            raise CheckpointError(f"{source}: EMA shards of {name!r} hold {flat.numel()} values, need {numel}")
        out[name] = flat[:numel].reshape(shape).clone()
    return out
