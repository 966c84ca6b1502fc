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
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.export import export_run

    export_run(args.run_dir, args.out, checkpoint=args.checkpoint, use_ema=not args.no_ema)
    return 0
