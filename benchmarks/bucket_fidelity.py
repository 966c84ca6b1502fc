"""Aspect-ratio buckets vs centre crops on mixed-shape data: held-out prompt fidelity of a tiny base U-Net sampled
square, 2:1 (wide) and 1:2 (tall), and how many named objects a centre crop cuts out of wide and tall images.

    python benchmarks/bucket_fidelity.py OUT [--steps 1000] [--prompts 64] [--seeds 0 1]

Data (written under OUT/shards if missing): `shards synthetic` scenes at 24 px area in seven shapes
(1:1, 4:3, 3:4, 16:9, 9:16, 2:1, 1:2, equal shares), train and held-out splits. Runs, both from
configs/demo/unet_buckets.yaml for `--steps` steps:

- ``buckets``: buckets 16x16, 12x20, 20x12, 12x24, 24x12 (height x width; 4:3 and 16:9 images go to 12x20, 2:1 to
  12x24) with SDXL size/crop conditioning, as a user training on such data would;
- ``centre``: the same network trained on centre squares (data.buckets and the size conditioning off).

Each is exported and samples the first `--prompts` held-out captions at 16x16, 12x24 and 24x12 (the centre model
was never trained on the last two; its bundle's shape check is lifted for this comparison), dpmpp_2m 20 steps,
guidance 3, per seed; pipeline/eval/fidelity.py judges colour / position / size / shape of every named object.
The table gives the hit rate with its binomial standard error over all seeds' objects.

Cut objects: for the held-out scenes drawn at 2:1 and 1:2, the share of named objects whose drawn extent
(centre +- radius) crosses the border of the centre square the loader would keep (partly cut), and the share
whose centre lies outside it (mostly gone).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.data.synthetic import canvas_size, parse_aspects, sample_scene, write_synthetic_shards  # noqa: E402
from pipeline.demo import heldout_prompts  # noqa: E402
from pipeline.eval.fidelity import fidelity_sums  # noqa: E402
from pipeline.export import export_run  # noqa: E402
from pipeline.machine import describe  # noqa: E402
from pipeline.sampling.text2image import Text2Image  # noqa: E402
from pipeline.train.entry import local_process_group, run_training  # noqa: E402

ASPECTS = "1:1,4:3,3:4,16:9,9:16,2:1,1:2"
RESOLUTION = 16  # the trained area (16 x 16 px)
SOURCE = 24  # shards are drawn at 24 px area, so a 2:1 image (34 x 17) covers its 12 x 24 bucket
BUCKETS = "[[16,16],[12,20],[20,12],[12,24],[24,12]]"
RUNS = {"buckets": (f"data.buckets.shapes={BUCKETS}",),
        "centre": ("data.buckets.enabled=false", "model.micro_conditioning.enabled=false")}
SHAPES = ((16, 16), (12, 24), (24, 12))  # (height, width): square, 2:1 wide, 1:2 tall
ASPECT_WORDS = {(16, 16): "1:1", (12, 24): "2:1 wide", (24, 12): "1:2 tall"}
FIGURES = ("colour", "position", "size", "shape")


def make_shards(out: Path, train_samples: int, heldout_samples: int) -> tuple[Path, Path]:
    aspects = parse_aspects(ASPECTS)
    dirs = (out / "shards" / "train", out / "shards" / "heldout")
    for directory, n, split, seed in ((dirs[0], train_samples, "train", 0), (dirs[1], heldout_samples, "heldout", 1)):
        if not (directory / "shards.json").exists():
            write_synthetic_shards(directory, n, 1000, SOURCE, seed, split, "jpg", aspects)
    return dirs


def train(out: Path, name: str, steps: int, train_dir: Path) -> tuple[Path, float]:
    """Train run `name` (resuming) and export it; returns (bundle, seconds)."""
    cfg = load_config(REPO / "configs" / "demo" / "unet_buckets.yaml",
                      [f"data.urls={train_dir}", f"train.max_steps={steps}", "train.sample_every=0",
                       f"ckpt.every_steps={steps}", *RUNS[name]])
    start = time.time()
    if run_training(cfg, out / "runs" / name) != 0:
        raise SystemExit(f"{name}: training failed")
    seconds = time.time() - start
    bundle = out / "bundles" / name
    if not bundle.exists():
        export_run(out / "runs" / name, bundle)
    return bundle, seconds


def fidelity(bundle: Path, scenes: list, shape: tuple[int, int], seeds: list[int]) -> dict[str, tuple[int, int]]:
    """(hits, objects) per figure over every seed's samples of the held-out captions at `shape`."""
    t2i = Text2Image.from_bundle(bundle)
    level = t2i.levels[0]
    if shape not in level.shapes:  # the centre-crop model: sampled at shapes it never trained on, on purpose
        t2i.levels[0] = dataclasses.replace(level, buckets=(*level.shapes, shape))
    prompts = [caption for caption, _, _ in scenes]
    totals = {k: [0, 0] for k in FIGURES}
    for seed in seeds:
        images = torch.cat([t2i.generate(prompts[i:i + 32], seed=seed, height=shape[0], width=shape[1])
                            for i in range(0, len(prompts), 32)])
        sums = fidelity_sums(((images.float() + 1) / 2).clamp(0, 1), [objects for _, _, objects in scenes])
        for k in FIGURES:
            totals[k][0] += round(sums[k][0])
            totals[k][1] += round(sums[k][1])
    return {k: (hits, count) for k, (hits, count) in totals.items()}


def cell(hits: int, count: int) -> str:
    p = hits / count
    return f"{p:.3f} +- {(p * (1 - p) / count) ** 0.5:.3f}"


def cut_objects(aspect: tuple[int, int], scenes: int = 2000) -> tuple[float, float]:
    """(partly cut, centre outside) shares of the named objects of held-out scenes drawn at `aspect` (W, H) when
    the loader keeps the centre square of the short side."""
    width, height = canvas_size(SOURCE, aspect)
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    cut = outside = total = 0
    for index in range(scenes):
        rng = np.random.default_rng([1, 1, index])  # as make_sample draws a held-out scene
        for obj in sample_scene(rng, "heldout", width, height):
            total += 1
            lo_x, hi_x, lo_y, hi_y = obj.cx - obj.radius, obj.cx + obj.radius, obj.cy - obj.radius, obj.cy + obj.radius
            cut += lo_x < x0 or hi_x > x0 + side or lo_y < y0 or hi_y > y0 + side
            outside += not (x0 <= obj.cx <= x0 + side and y0 <= obj.cy <= y0 + side)
    return cut / total, outside / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--train-samples", type=int, default=14000)
    args = parser.parse_args(argv)
    train_dir, heldout_dir = make_shards(args.out, args.train_samples, max(256, args.prompts))
    scenes = heldout_prompts(heldout_dir, args.prompts)
    objects = sum(len(o) for _, _, o in scenes) * len(args.seeds)
    print(f"# buckets vs centre crops, {args.steps} training steps (batch 32, 16 px area, aspects {ASPECTS}), "
          f"{len(scenes)} held-out prompts x seeds {args.seeds} ({objects} objects per cell); {describe()}, "
          f"torch {torch.__version__}, {datetime.date.today().isoformat()}", flush=True)
    for aspect in ((2, 1), (1, 2)):
        cut, outside = cut_objects(aspect)
        print(f"centre crop of {aspect[0]}:{aspect[1]} held-out scenes: {cut:.1%} of named objects partly cut, "
              f"{outside:.1%} with their centre outside the kept square", flush=True)
    print("| run | train s | shape (h x w) | " + " | ".join(FIGURES) + " |")
    print("|---|---|---|" + "---|" * len(FIGURES), flush=True)
    with local_process_group():
        for name in args.runs:
            bundle, seconds = train(args.out, name, args.steps, train_dir)
            for shape in SHAPES:
                found = fidelity(bundle, scenes, shape, args.seeds)
                print(f"| {name} | {seconds:.0f} | {shape[0]}x{shape[1]} ({ASPECT_WORDS[shape]}) | "
                      + " | ".join(cell(*found[k]) for k in FIGURES) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
