"""``python -m pipeline train CONFIG --run-dir DIR [--set k=v ...]``."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_config


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "train", parents=[common], help="train one stage from a YAML config",
        description="Train one stage. Run the same command again to resume from RUN_DIR/checkpoints/latest. "
                    "Launch one process per GPU with torchrun, the deepspeed launcher, srun or accelerate; "
                    "rank and world size are read from their environment variables.")
    parser.add_argument("config", help="YAML run config, e.g. configs/demo/clip.yaml")
    parser.add_argument("--run-dir", required=True, type=Path,
                        help="directory for checkpoints, metrics.jsonl, TensorBoard logs and the resolved config")
    parser.add_argument("--set", action="extend", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override config values: --set train.max_steps=100 optim.lr=1e-4, or one per --set "
                             "(--set train.max_steps=100 --set optim.lr=1e-4); later ones win")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.train.entry import run_training  # start-up time: imported when the subcommand runs (cli/main.py)

    cfg = load_config(args.config, args.overrides)
    return run_training(cfg, args.run_dir)
