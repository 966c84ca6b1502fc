"""Entry point of ``python -m pipeline``: subcommands, exit codes, one-line errors.

Exit codes: 0 success, 2 usage or configuration errors, 1 any other failure. Errors print as one line
(``error: ...``) unless ``--debug`` is given, which re-raises with the full traceback.

Building the parser imports every subcommand module; the heavy ones (train, export, sample, demo, eval-stats, evaluate) import what they
run only inside their handler, so ``--help`` and a mistyped command answer at once instead of after importing
DeepSpeed, diffusers and every stage.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pipeline.cli import demo, eval_stats, evaluate, export, sample, shards, train
from pipeline.errors import PipelineError

SUBCOMMANDS = (shards, train, export, sample, demo, eval_stats, evaluate)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks instead of one-line errors")
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", parents=[common],
        description="Distributed text-to-image training: build shards, train stages, export and sample.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on usage errors
    debug = getattr(args, "debug", False) or os.environ.get("PIPELINE_DEBUG") == "1"
    try:
        return int(args.handler(args) or 0)
    except PipelineError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, not a traceback
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1
