"""``python -m pipeline evaluate``: a bundle's FID, KID and CLIP score per guidance scale, offline.

Prompts come from shards (their captions; their images are the real set FID/KID compare with unless statistics
from ``eval-stats`` are given) or from a text file (one prompt per line: FID then needs ``--fid-stats``, KID is left
out). Prompts are cut into batches of a fixed size; batch b is sampled through the whole cascade with seed
``seed + b`` by rank ``b % world_size``, so the images do not depend on the number of ranks. Every rank's features
are gathered; rank 0 writes report.json, table.md, the FID-vs-CLIP-score plot and one grid per guidance scale.
"""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from PIL import Image, ImageDraw

from pipeline.data.skips import SkipCounter
from pipeline.data.sources import expand_shard_specs
from pipeline.data.tar_reader import iter_shard
from pipeline.data.transforms import SkipSample, image_bytes, read_caption
from pipeline.errors import DataError, UsageError
from pipeline.eval.clip_score import clip_image_features, clip_scores, clip_text_features
from pipeline.eval.frechet import load_reference_stats
from pipeline.eval.generation import generation_figures
from pipeline.eval.inception import load_inception
from pipeline.eval.reference import square_image
from pipeline.models.frozen_clip import FrozenClip
from pipeline.sampling.text2image import Text2Image, save_grid, to_pil
from pipeline.train.launch_env import LaunchEnv, detect_launch_env

GRID_IMAGES = 16


@dataclass(frozen=True)
class EvaluateJob:
    """One offline evaluation (see the module docstring); clip '' = the bundle's own CLIP when it has one."""

    bundle: Path
    prompts: str
    num_images: int
    guidances: tuple[float, ...]
    out: Path
    inception_weights: str = ""
    fid_stats: str = ""
    clip: str = ""
    steps: int | None = None
    seed: int = 0
    batch_size: int = 16
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    device: str = "cpu"


def read_prompts(source: str, limit: int) -> tuple[list[str], list[bytes | None]]:
    """The first `limit` prompts and their image bytes (None for a text file) from shards or a text file."""
    path = Path(source)
    if path.is_file() and path.suffix != ".tar":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return lines[:limit], [None] * min(limit, len(lines))
    captions: list[str] = []
    images: list[bytes | None] = []
    skips = SkipCounter(max_fraction=1.0, min_seen=0)
    for url in expand_shard_specs(source, "--prompts"):
        for _, _, members in iter_shard(url, skips.add):
            try:
                caption, data = read_caption(members, "txt"), image_bytes(members)
            except SkipSample as skip:
                skips.add(skip.reason, skip.detail)
                continue
            captions.append(caption)
            images.append(data)
            if len(captions) == limit:
                return captions, images
    return captions, images


def _gather(share: dict, env: LaunchEnv) -> list[dict]:
    if env.world_size == 1:
        return [share]
    shares: list = [None] * env.world_size
    tdist.all_gather_object(shares, share)
    return shares


def _rank_rows(job: EvaluateJob, t2i: Text2Image, prompts: list[str], images: list[bytes | None],
               env: LaunchEnv, inception, clip: FrozenClip | None) -> tuple[list[dict], list, list[float]]:
    """Per guidance scale: this rank's share (ids, fake/real features, CLIP scores), its first images, and its
    seconds (sampling and features)."""
    batches = [list(range(i, min(i + job.batch_size, len(prompts)))) for i in range(0, len(prompts), job.batch_size)]
    mine = [b for b in range(len(batches)) if b % env.world_size == env.rank]
    with_real = inception is not None and all(data is not None for data in images)
    real: dict[int, torch.Tensor] = {}  # batch -> real images' features, at the generated side (known after one)
    shares, grids, seconds = [], [], []
    for guidance in job.guidances:
        rows: dict[str, list] = {"ids": [], "fake": [], "real": [], "scores": []}
        grid: list[Image.Image] = []
        start = time.perf_counter()
        for b in mine:
            chosen = [prompts[i] for i in batches[b]]
            generated = t2i.generate(chosen, guidance=guidance, steps=job.steps, seed=job.seed + b)
            unit = ((generated.float().cpu() + 1) / 2).clamp(0, 1)
            grid.extend(to_pil(generated[:GRID_IMAGES - len(grid)]))
            rows["ids"].append(torch.tensor(batches[b], dtype=torch.int64))
            if inception is not None:
                rows["fake"].append(inception(unit))
            if with_real:
                if b not in real:
                    side = unit.shape[-1]
                    real[b] = inception(torch.stack([square_image(images[i], side) for i in batches[b]]))
                rows["real"].append(real[b])
            if clip is not None:
                rows["scores"].append(clip_scores(clip_image_features(clip, unit), clip_text_features(clip, chosen)))
        seconds.append(time.perf_counter() - start)
        shares.append({k: torch.cat(v) for k, v in rows.items() if v})
        grids.append(grid)
    return shares, grids, seconds


def _padded(values: list[float]) -> tuple[float, float]:
    """An axis range around `values` with 10% room on each side (1 unit when they are all equal)."""
    low, high = min(values), max(values)
    room = 0.1 * (high - low) if high > low else 0.5 * max(1.0, abs(low))
    return low - room, high + room


def plot_fid_vs_clip(rows: list[dict], path: Path, size: int = 480) -> None:
    """FID (y) against CLIP score (x) per guidance scale, as a PNG drawn with PIL (no plotting library needed)."""
    points = [(r["clip_score"], r["fid"], r["guidance"]) for r in rows if "fid" in r and "clip_score" in r]
    if not points:
        return
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    margin = 60
    x0, x1 = _padded([p[0] for p in points])
    y0, y1 = _padded([p[1] for p in points])

    def at(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x0) / (x1 - x0) * (size - 2 * margin),
                size - margin - (y - y0) / (y1 - y0) * (size - 2 * margin))

    draw.line([(margin, margin / 2), (margin, size - margin), (size - margin / 2, size - margin)], fill="black")
    draw.text((size / 2 - 40, size - margin + 20), "CLIP score", fill="black")
    draw.text((8, margin / 2 - 20), "FID", fill="black")
    for value, pos in ((x0, "x"), (x1, "x"), (y0, "y"), (y1, "y")):
        x, y = at(value if pos == "x" else x0, value if pos == "y" else y0)
        draw.text((x - 15, size - margin + 5) if pos == "x" else (5, y - 6), f"{value:.3g}", fill="black")
    if len(points) > 1:
        draw.line([at(x, y) for x, y, _ in points], fill="steelblue", width=2)
    for x, y, guidance in points:
        px, py = at(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill="steelblue")
        draw.text((px + 6, py - 14), f"w={guidance:g}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _write(job: EvaluateJob, rows: list[dict], grids: list, prompts: int) -> None:
    job.out.mkdir(parents=True, exist_ok=True)
    report = {"bundle": str(job.bundle), "prompts": job.prompts, "num_images": prompts, "seed": job.seed,
              "steps": job.steps, "batch_size": job.batch_size, "fid_stats": job.fid_stats, "rows": rows}
    (job.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    columns = ("guidance", "fid", "kid", "kid_std", "clip_score", "seconds")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:.4g}" if c in r else "-" for c in columns) + " |" for r in rows]
    (job.out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_fid_vs_clip(rows, job.out / "fid_vs_clip_score.png")
    for row, grid in zip(rows, grids):
        if grid:
            save_grid(grid, job.out / f"grid_guidance_{row['guidance']:g}.png")


def run_evaluate(job: EvaluateJob) -> list[dict] | None:
    """Run the evaluation on this process's rank; returns the rows on rank 0 (None elsewhere)."""
    if job.num_images < 2 or not job.guidances or min(job.guidances) < 1 or job.batch_size < 1:
        raise UsageError("--num-images must be >= 2, every --guidance >= 1 and --batch-size >= 1")
    if job.fid_stats and not job.inception_weights:
        raise UsageError("--fid-stats needs --inception-weights (the statistics are Inception features)")
    env = detect_launch_env()
    device = f"cuda:{env.local_rank}" if env.world_size > 1 and torch.cuda.is_available() else job.device
    if env.world_size > 1:
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=env.init_method,
                                 rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=1800))
    try:
        return _run(job, env, device)
    finally:
        if env.world_size > 1:
            tdist.destroy_process_group()


def _run(job: EvaluateJob, env: LaunchEnv, device: str) -> list[dict] | None:
    prompts, images = read_prompts(job.prompts, job.num_images)
    if len(prompts) < 2:
        raise DataError(f"--prompts {job.prompts}: {len(prompts)} prompt(s) found; need at least 2")
    inception = load_inception(job.inception_weights, "--inception-weights").to(device) \
        if job.inception_weights else None
    t2i = Text2Image.from_bundle(job.bundle, device)
    clip_dir = job.clip or (str(job.bundle / "clip") if (job.bundle / "clip").is_dir() else "")
    clip = FrozenClip.load(clip_dir, "--clip").to(device) if clip_dir else None
    shares, grids, seconds = _rank_rows(job, t2i, prompts, images, env, inception, clip)
    gathered = [_gather(share, env) for share in shares]
    total_seconds = _gather({"seconds": seconds}, env)
    if env.rank != 0:
        return None
    reference = None
    if job.fid_stats:
        side = next(iter(grids[0])).size[0]
        reference = load_reference_stats(job.fid_stats, inception.digest, side, "--fid-stats")
    rows = []
    for guidance, parts in zip(job.guidances, gathered):
        figures = generation_figures([p for p in parts if "ids" in p], reference, job.kid_subsets,
                                     job.kid_subset_size, job.seed)
        rows.append({"guidance": guidance, **figures})
    for i, row in enumerate(rows):  # wall-clock: the slowest rank
        row["seconds"] = max(s["seconds"][i] for s in total_seconds)
    _write(job, rows, grids, len(prompts))
    return rows
