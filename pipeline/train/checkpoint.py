"""Sharded, verified, atomically published checkpoints under ``RUN_DIR/checkpoints``.

Layout of one checkpoint (``step_XXXXXXXX``, the optimizer step it was taken after)::

    PART/ds/...                         DeepSpeed's own sharded files of each trainable part (every rank writes
                                        its ZeRO shard: mp_rank_*_model_states.pt, zero_pp_rank_*_optim_states.pt)
    PART/zero_to_fp32.py                DeepSpeed's recovery script (ZeRO >= 1)
    client_rankRRRRR.pt                 per rank: RNG states (python, numpy, torch, cuda) + data-loader state
    ema_PART.safetensors                EMA, replicated (ZeRO 0-2, rank 0 writes) ...
    ema_PART_rankRRRRR.safetensors      ... or this rank's shard of it (ZeRO-3)
    trainer.json                        format version, step, counters, world size, ZeRO stage, precision, parts
    config.yaml                         the resolved run config
    MANIFEST.json                       written last: relative path -> size + sha256 of every file above

Publishing: all ranks write into ``step_XXXXXXXX.partial``; after a barrier the files are hashed (each rank
hashes a share), rank 0 writes the manifest, renames the folder to its final name and only then replaces
``checkpoints/latest`` (a text file naming the checkpoint) via temp file + ``os.replace``. A crash at any point
leaves ``latest`` naming the previous complete checkpoint. ``ckpt.keep_last`` prunes older complete ones.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CheckpointError
from pipeline import manifest
from pipeline.train import rng
from pipeline.train.backend import Dist, Part
from pipeline.train.ema import EMA, load_ema, save_ema

FORMAT_VERSION = 1
LATEST = "latest"
DS_TAG = "ds"
TRAINER_JSON = "trainer.json"
CONFIG_YAML = "config.yaml"
log = logging.getLogger(__name__)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def client_filename(rank: int) -> str:
    return f"client_rank{rank:05d}.pt"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (manifest present) under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")
             and (p / manifest.MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names; if that one is gone, the newest complete one (with a warning)."""
    latest = root / LATEST
    if latest.is_file():
        named = root / latest.read_text(encoding="utf-8").strip()
        if (named / manifest.MANIFEST).is_file():
            return named
        log.warning("%s names %s, which is not a complete checkpoint; using the newest complete one", latest, named)
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / LATEST)


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (never the one `latest` names)."""
    if keep_last <= 0:
        return
    protected = find_latest(root)
    for old in complete_checkpoints(root)[:-keep_last]:
        if old != protected:
            shutil.rmtree(old, ignore_errors=True)


def read_trainer_json(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / TRAINER_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir}: checkpoint format version {version}, this code reads version "
                              f"{FORMAT_VERSION}; export it with the version that wrote it")
    return meta


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """Which checkpoint to resume from under policy ckpt.resume ('auto' | 'never' | a path)."""
    root = run_dir / "checkpoints"
    if resume == "never":
        existing = complete_checkpoints(root)
        if existing:
            raise CheckpointError(f"{run_dir} already has checkpoints (newest: {existing[-1].name}) and "
                                  "ckpt.resume=never; use a new --run-dir, or ckpt.resume=auto to continue")
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        path = find_latest(path / "checkpoints") or path
    if not (path / manifest.MANIFEST).is_file():
        raise CheckpointError(f"ckpt.resume={resume}: not a complete checkpoint directory (no "
                              f"{manifest.MANIFEST}; expected RUN_DIR/checkpoints/step_XXXXXXXX or a run dir)")
    return path


@dataclass
class Restored:
    """What a loaded checkpoint hands back to the Trainer (engines and EMA are already restored)."""

    path: Path
    step: int
    counters: dict[str, int]
    rng: dict[str, Any]
    data: dict[str, Any]


class Checkpointer:
    """Saves and loads the complete training state of this rank; all ranks call save/load together."""

    def __init__(self, run_dir: Path, dist: Dist, parts: Mapping[str, Part], emas: Mapping[str, EMA],
                 fingerprint: dict[str, Any], config_text: str, keep_last: int) -> None:
        self.root = run_dir / "checkpoints"
        self.dist, self.parts, self.emas = dist, parts, emas
        self.fingerprint = fingerprint  # world_size, zero_stage, precision, parts, stage, ema: must match on resume
        self.config_text, self.keep_last = config_text, keep_last

    # ----------------------------------------------------------------------------------------------- save
    def save(self, step: int, counters: dict[str, int], data_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` (all ranks), publish it via manifest + `latest`; returns its final path."""
        final = self.root / step_name(step)
        partial = final.with_name(final.name + ".partial")
        if self.dist.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.partial"):  # left by an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir()
        self.dist.barrier("checkpoint start")
        for name, part in self.parts.items():
            part.engine.save_checkpoint(str(partial / name), tag=DS_TAG, client_state={}, save_latest=False)
        torch.save({"rank": self.dist.rank, "rng": rng.capture(), "data": data_state},
                   partial / client_filename(self.dist.rank))
        for name, ema in self.emas.items():
            save_ema(ema, name, partial, self.dist.rank, self.dist.world_size)
        if self.dist.rank == 0:
            meta = {"format_version": FORMAT_VERSION, "step": step, "counters": counters,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **self.fingerprint}
            manifest.write_json_atomic(partial / TRAINER_JSON, meta)
            (partial / CONFIG_YAML).write_text(self.config_text, encoding="utf-8")
        self.dist.barrier("checkpoint files written")  # every rank finished writing before anything is published
        entries = self._hash_shared(partial)
        if self.dist.rank == 0:
            manifest.write_manifest(partial, entries)
            if final.exists():  # re-saving a step (after resuming from an older checkpoint): replace it
                shutil.rmtree(final)
            os.replace(partial, final)
            write_latest(self.root, final.name)
            prune(self.root, self.keep_last)
        self.dist.barrier("checkpoint published")
        return final

    def _hash_shared(self, ckpt_dir: Path) -> dict[str, dict[str, int | str]]:
        """Hash all files, each rank a disjoint share (the folder is on a filesystem all ranks see)."""
        files = manifest.list_files(ckpt_dir)
        mine = manifest.describe(ckpt_dir, files[self.dist.rank::self.dist.world_size])
        merged: dict[str, dict[str, int | str]] = {}
        for share in self.dist.gather_objects(mine):
            merged.update(share)
        return merged

    # ----------------------------------------------------------------------------------------------- load
    def verify(self, ckpt_dir: Path) -> dict[str, Any]:
        """Verify the manifest (each rank checks a share; all ranks raise the same error) and the run fingerprint."""
        entries = manifest.read_manifest(ckpt_dir)
        names = sorted(entries)
        problems = manifest.verify_files(ckpt_dir, entries, names[self.dist.rank::self.dist.world_size])
        every = [p for share in self.dist.gather_objects(problems) for p in share]
        if every:
            more = f" (and {len(every) - 1} more)" if len(every) > 1 else ""
            raise CheckpointError(f"corrupted checkpoint: {every[0]}{more}")
        meta = read_trainer_json(ckpt_dir)
        self._check_fingerprint(ckpt_dir, meta)
        return meta

    def _check_fingerprint(self, ckpt_dir: Path, meta: dict[str, Any]) -> None:
        if meta.get("world_size") != self.fingerprint["world_size"]:
            raise CheckpointError(
                f"{ckpt_dir} was written by {meta.get('world_size')} ranks, this run has "
                f"{self.fingerprint['world_size']}; resume with the same number of processes (ZeRO shards, RNG "
                "streams and every rank's data position are per rank), or start a new run from its weights with "
                "ckpt.init_from")
        for key in ("stage", "parts", "zero_stage", "precision", "ema"):
            if meta.get(key) != self.fingerprint[key]:
                raise CheckpointError(f"{ckpt_dir}: {key} is {meta.get(key)!r} in the checkpoint but "
                                      f"{self.fingerprint[key]!r} in this run; resume with the same setting")

    def load(self, ckpt_dir: Path) -> Restored:
        """Restore engines (model + optimizer) and EMA from `ckpt_dir`; return step, counters, RNG, data state."""
        meta = self.verify(ckpt_dir)
        for name, part in self.parts.items():
            try:
                path, _ = part.engine.load_checkpoint(str(ckpt_dir / name), tag=DS_TAG, load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
            except (RuntimeError, KeyError, ValueError) as exc:  # strict key/shape mismatch, foreign layout
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                raise CheckpointError(f"{ckpt_dir / name}: part {name!r} does not match this model "
                                      f"({' '.join(lines)[:300]})") from None
            if path is None:
                raise CheckpointError(f"{ckpt_dir / name}: DeepSpeed could not load part {name!r}")
        for name, ema in self.emas.items():
            load_ema(ema, name, ckpt_dir, self.dist.rank)
        client_path = ckpt_dir / client_filename(self.dist.rank)
        try:
            client = torch.load(client_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise CheckpointError(f"{client_path}: cannot load client state ({exc})") from None
        if client.get("rank") != self.dist.rank:
            raise CheckpointError(f"{client_path}: holds the state of rank {client.get('rank')}")
        self.dist.barrier("checkpoint loaded")
        return Restored(ckpt_dir, int(meta["step"]), dict(meta["counters"]), client["rng"], client["data"])
