"""``python -m pipeline demo [--out DIR]``: the embedded default job on CPU."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "demo", parents=[common], help="run the embedded demo end to end (CPU friendly)",
        description="Generate synthetic shards, train every available stage tiny, export, and print figures "
                    "that show what the models learned.")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default demo_out)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo  # start-up time: imported when the subcommand runs (cli/main.py)

    return run_demo(args.out)
