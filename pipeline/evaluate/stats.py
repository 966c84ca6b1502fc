"""Reference statistics of real images for FID, computed once (``python -m pipeline eval-stats``): under a
launcher every rank takes its share of the images (sample g goes to rank g % world_size) and the float64 sums are
all-reduced, so any number of ranks writes the same file up to the order of float64 additions."""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from pipeline.data.skips import SkipCounter
from pipeline.errors import DataError
from pipeline.eval.frechet import FeatureStats, ReferenceStats
from pipeline.eval.inception import load_inception
from pipeline.eval.reference import real_image_stats
from pipeline.train.launch_env import LaunchEnv, detect_launch_env


@dataclass(frozen=True)
class StatsJob:
    """What eval-stats computes: shards -> `out`, with the Inception weights file, the first `num_samples`
    samples (0 = all), images resized to `resolution`."""

    shards: str
    out: Path
    inception_weights: str
    num_samples: int = 0
    resolution: int = 64
    batch_size: int = 32
    device: str = "cpu"


def _all_reduce(stats: FeatureStats, env: LaunchEnv) -> FeatureStats:
    """The sum of every rank's statistics (one all-reduce of the flat sums, in a group made for it)."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend, init_method=env.init_method, rank=env.rank, world_size=env.world_size,
                             timeout=datetime.timedelta(seconds=600))
    try:
        device = torch.device("cuda", env.local_rank) if backend == "nccl" else torch.device("cpu")
        flat = stats.flat().to(device)
        tdist.all_reduce(flat)
        return FeatureStats.from_flat(flat, stats.dim)
    finally:
        tdist.destroy_process_group()


def write_reference_stats(job: StatsJob) -> str | None:
    """Compute and (rank 0) write the statistics file; returns rank 0's one-line summary, None on other ranks."""
    env = detect_launch_env()
    device = f"cuda:{env.local_rank}" if env.world_size > 1 and torch.cuda.is_available() else job.device
    extractor = load_inception(job.inception_weights, "--inception-weights").to(device)
    skips = SkipCounter(max_fraction=1.0, min_seen=0)
    stats = real_image_stats(job.shards, extractor, extractor.dim, job.resolution, job.num_samples, env.rank,
                             env.world_size, job.batch_size, skips)
    if env.world_size > 1:
        stats = _all_reduce(stats, env)
    if stats.count < 2:
        raise DataError(f"eval-stats: {stats.count} readable image(s) in {job.shards}; need at least 2")
    if env.rank != 0:
        return None
    job.out.parent.mkdir(parents=True, exist_ok=True)
    ReferenceStats.from_stats(stats, extractor.digest, job.resolution).save(job.out)
    skipped = f"; skipped on rank 0: {dict(skips.counts)}" if skips.counts else ""
    return (f"wrote {job.out}: {stats.count} images at {job.resolution} px, Inception weights sha256 "
            f"{extractor.digest[:12]}{skipped}")
