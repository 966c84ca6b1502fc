"""``python -m pipeline export RUN_DIR --out BUNDLE_DIR``."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "export", parents=[common], help="consolidate a run's latest checkpoint into a weights bundle",
        description="Consolidate the (possibly ZeRO-sharded) latest checkpoint of a run into a bundle of "
                    "safetensors weights plus configs, usable without this training code.")
    parser.add_argument("run_dir", type=Path, help="a training run directory (contains checkpoints/latest)")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    parser.add_argument("--checkpoint", default="latest",
                        help="checkpoint name under RUN_DIR/checkpoints to export (default: latest)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights even when an EMA exists")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="precision of the written weights (default fp32)")
    parser.add_argument("--t5-reference", action="store_true",
                        help="index a U-Net stage's T5 by its original path instead of copying it into the bundle")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.export import export_run  # start-up time: imported when the subcommand runs (cli/main.py)

    folder = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, use_ema=not args.no_ema,
                        dtype=args.dtype, t5_reference=args.t5_reference)
    print(f"exported {folder}")
    return 0
