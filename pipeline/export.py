"""``python -m pipeline export RUN_DIR --out BUNDLE``: a run's checkpoint -> one component of an export bundle.

Works for every stage, ZeRO stage and world size in one CPU process without torch.distributed: the checkpoint is
verified, its stage rebuilt from the config stored in it, every part consolidated to full weights with the EMA
applied (unless ``--no-ema``) and loaded strictly (:mod:`pipeline.train.weights`), cast to ``--dtype``, and
written by the stage as a folder its users' library loads (:mod:`pipeline.bundle` describes the layout). Frozen
helpers the component needs to be sampled (the T5 of a U-Net stage) are written next to it. Exporting several
runs into one bundle assembles a cascade.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline.bundle import add_component, bundle_lock
from pipeline.errors import UsageError
from pipeline.train.weights import restore_stage

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_run(run_dir: Path, out: Path, *, checkpoint: str = "latest", use_ema: bool = True, dtype: str = "fp32",
               t5_reference: bool = False) -> Path:
    """Write the component of checkpoint `checkpoint` of `run_dir` into bundle `out`; returns the component dir.

    dtype: fp32 | bf16 | fp16 of the written weights; t5_reference: index a U-Net's T5 by its original path
    instead of copying it (large T5s).
    """
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    restored = restore_stage(Path(run_dir), checkpoint, use_ema)
    stage, modules = restored.stage, restored.modules
    for module in modules.values():
        module.to(DTYPES[dtype])
    out = Path(out)
    name = stage.component_name()
    folder = out / name
    with bundle_lock(out):  # other exports into this bundle may be running
        if folder.exists():  # a re-export replaces the component: stale files would fail the bundle's verification
            shutil.rmtree(folder)
        info = stage.export(modules, folder) or {}
        for helper, entry in stage.export_helpers(out, DTYPES[dtype], t5_reference).items():
            add_component(out, helper, entry)
        add_component(out, name, {"kind": stage.name, "stage": stage.cfg.stage,
                                  "checkpoint": str(restored.ckpt.resolve()), "step": restored.meta["step"],
                                  "ema": restored.ema, "parts": restored.meta["parts"], "dtype": dtype, **info})
    return folder
