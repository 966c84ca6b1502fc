"""``python -m pipeline evaluate BUNDLE --prompts SHARDS|FILE --num-images N --guidance 1,2,4,8 --out DIR``."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import UsageError


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,2,4,8, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "evaluate", parents=[common], help="FID, KID and CLIP score of a bundle per guidance scale",
        description="Sample the bundle's cascade for N prompts at each guidance scale and write report.json, "
                    "table.md (FID, KID, CLIP score per scale), fid_vs_clip_score.png and one grid per scale. "
                    "Under torchrun the prompt batches are split over the ranks.")
    parser.add_argument("bundle", type=Path, help="bundle directory written by `python -m pipeline export`")
    parser.add_argument("--prompts", required=True,
                        help="shards (captions; their images are the real set) or a text file, one prompt a line")
    parser.add_argument("--num-images", type=int, required=True, help="prompts used, one image each")
    parser.add_argument("--guidance", type=_scales, default=(1.0, 2.0, 4.0, 8.0),
                        help="comma-separated guidance scales (default 1,2,4,8)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--inception-weights", default="",
                        help="torch-fidelity's TF-Inception weights file for FID/KID ('' = none)")
    parser.add_argument("--fid-stats", default="", help="eval-stats file FID compares with (default: the images "
                                                        "of the prompt shards)")
    parser.add_argument("--clip", default="", help="open_clip folder for CLIP score (default: the bundle's clip)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per stage (default: each stage's)")
    parser.add_argument("--seed", type=int, default=0, help="batch b is sampled with seed + b (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per sampling batch (default 16)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.evaluate.offline import EvaluateJob, run_evaluate  # start-up time (cli/main.py)

    if args.kid_subsets < 1 or args.kid_subset_size < 2:
        raise UsageError("--kid-subsets must be >= 1 and --kid-subset-size >= 2")
    rows = run_evaluate(EvaluateJob(args.bundle, args.prompts, args.num_images, args.guidance, args.out,
                                    args.inception_weights, args.fid_stats, args.clip, args.steps, args.seed,
                                    args.batch_size, args.kid_subsets, args.kid_subset_size, args.device))
    for row in rows or []:
        figures = ", ".join(f"{k} {row[k]:.4g}" for k in ("fid", "kid", "clip_score") if k in row)
        print(f"guidance {row['guidance']:g}: {figures}")
    if rows is not None:
        print(f"wrote {args.out / 'report.json'}, table.md, fid_vs_clip_score.png and grids in {args.out}")
    return 0
