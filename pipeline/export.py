"""Consolidate a run's checkpoint into a weights bundle (``python -m pipeline export RUN_DIR --out BUNDLE``).

Works for every stage and ZeRO stage in one CPU process without torch.distributed:

1. find the checkpoint (``latest`` or ``--checkpoint NAME``) and verify its manifest (size + sha256 of every file);
2. rebuild the stage from the resolved config stored *in the checkpoint* (not from today's YAML);
3. per trainable part, consolidate full fp32 weights: DeepSpeed's ``zero_to_fp32`` for ZeRO 1-3 (it reassembles
   the fp32 master partitions of every rank), the module state of ``mp_rank_00_model_states.pt`` at ZeRO-0;
4. overlay the EMA parameters when the checkpoint has an EMA (unless ``--no-ema``; ZeRO-3 EMA shards are
   reassembled like the weights);
5. load strictly (no missing, unexpected or mis-shaped key) into freshly built modules and hand them to
   ``stage.export(modules, BUNDLE/<component>)``;
6. merge the component into ``BUNDLE/bundle.json`` so the runs of a cascade (clip, prior, unet_base, ...) can be
   exported into one bundle.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.config import config_from_text
from pipeline.errors import CheckpointError
from pipeline.stages.base import StageContext
from pipeline.stages.registry import stage_class

BUNDLE_JSON = "bundle.json"
BUNDLE_FORMAT = 1


def resolve_checkpoint(path: Path, name: str = "latest") -> Path:
    """A complete checkpoint directory from a run dir (+ checkpoint name) or from a checkpoint dir itself."""
    from pipeline.train.checkpoint import find_latest
    from pipeline.train.manifest import MANIFEST

    if (path / MANIFEST).is_file() and name == "latest":
        return path
    root = path / "checkpoints"
    if name == "latest":
        found = find_latest(root)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint to export (expected {root}/latest naming a "
                                  "checkpoint with a MANIFEST.json; has the run saved one yet?)")
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
    if use_ema:
        ema = read_full_ema(ckpt, part)
        if ema is not None:
            unknown = sorted(set(ema) - set(state))
            if unknown:
                raise CheckpointError(f"{ckpt}: EMA of part {part!r} has parameters the weights lack: {unknown[:5]}")
            state.update(ema)
    return state


def _merge_bundle_json(out: Path, component: str, entry: dict[str, Any]) -> None:
    path = out / BUNDLE_JSON
    bundle: dict[str, Any] = {"format_version": BUNDLE_FORMAT, "components": {}}
    if path.is_file():
        try:
            bundle = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"{path}: existing bundle index is not valid JSON ({exc})") from None
        if bundle.get("format_version") != BUNDLE_FORMAT:
            raise CheckpointError(f"{path}: bundle format {bundle.get('format_version')}, expected {BUNDLE_FORMAT}")
    bundle.setdefault("components", {})[component] = entry
    tmp = path.with_name(BUNDLE_JSON + ".tmp")
    tmp.write_text(json.dumps(bundle, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def export_run(run_dir: Path, out: Path, *, checkpoint: str = "latest", use_ema: bool = True) -> Path:
    """Write the component of checkpoint `checkpoint` of `run_dir` into bundle `out`; returns the component dir."""
    from pipeline.train.checkpoint import CONFIG_YAML, read_trainer_json
    from pipeline.train.manifest import verify_checkpoint
    from pipeline.train.rng import isolated, seed_all
    from pipeline.train.setup import load_strict

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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    component = stage.component_name()
    stage.export(modules, out / component)
    _merge_bundle_json(out, component, {"stage": cfg.stage, "checkpoint": str(ckpt.resolve()), "step": meta["step"],
                                        "ema": with_ema, "parts": meta["parts"]})
    return out / component
