"""``python -m pipeline eval-stats SHARDS --out STATS.npz --inception-weights FILE [--num-samples N]
[--resolution R]``: reference statistics of real images for FID, computed once (split over ranks under torchrun)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import UsageError


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "eval-stats", parents=[common], help="Inception feature statistics of real images (FID reference)",
        description="Decode the real images of SHARDS, centre-crop and resize them to the side the evaluated stage "
                    "generates (clean-fid's resize), and write the mean and covariance of their TF-Inception "
                    "pool features with the weights' sha256 and the side; runs point eval.fid_stats at the file. "
                    "Under torchrun the images are split over the ranks.")
    parser.add_argument("shards", help="shard directory, brace pattern or list (as data.urls)")
    parser.add_argument("--out", required=True, type=Path, help="statistics file to write (.npz)")
    parser.add_argument("--inception-weights", required=True,
                        help="torch-fidelity's TF-Inception weights file (what eval.inception_weights names)")
    parser.add_argument("--num-samples", type=int, default=0,
                        help="use the first N samples of the shards in order (default 0: all)")
    parser.add_argument("--resolution", type=int, default=64,
                        help="side in pixels the evaluated stage generates (default 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per feature-extractor batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu; under torchrun with "
                                                        "GPUs each rank uses cuda:LOCAL_RANK)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.evaluate.stats import StatsJob, write_reference_stats  # start-up time (cli/main.py)

    if args.resolution < 1 or args.num_samples < 0 or args.batch_size < 1:
        raise UsageError("--resolution and --batch-size must be >= 1 and --num-samples >= 0")
    summary = write_reference_stats(StatsJob(args.shards, args.out, args.inception_weights, args.num_samples,
                                             args.resolution, args.batch_size, args.device))
    if summary:
        print(summary)
    return 0
