"""torch.compile with aspect-ratio buckets: how many compiles a bucketed run makes under each
`train.compile_shapes` policy, and the step time once compiled.

    python benchmarks/bucket_compile.py                       # GPU: configs/demo/unet_buckets.yaml, inductor
    python benchmarks/bucket_compile.py --backend aot_eager --policies dynamic static --shapes 3 --rounds 2  # CPU

What runs is the Trainer's own step (benchmarks/train_throughput.py's `build` / `train_step`: the stage, DeepSpeed
engines with train.compile on, StepRunner, EMA) fed synthetic micro-batches that walk through `--shapes` bucket
shapes of the config (spread over its aspect ratios, widest to tallest) `--rounds` times, one shape per step, as
a bucketed loader hands them out. Per policy (a fresh build after `torch._dynamo.reset()`, Inductor's on-disk
graph cache off so no policy reuses another's kernels):

- compiling steps: steps during which Dynamo captured at least one new graph (the first round's steps that met a
  new shape, under `static`; only the first step under `dynamic`); "later rounds" counts those after the first
  round, which must be 0 for "no recompile per step".
- graphs: Dynamo's count of distinct graphs captured (a graph break makes more than one per compile).
- first round s: wall time of the first round (compiling included); steady ms: median step of the last round.
- eager: the same steps with train.compile off, for the speed comparison.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import train_throughput as throughput  # noqa: E402

DEFAULT_CONFIG = "configs/demo/unet_buckets.yaml"
POLICIES = ("eager", "dynamic", "default", "static")


def spread(shapes: tuple[tuple[int, int], ...], count: int) -> list[tuple[int, int]]:
    """`count` of `shapes` (ordered widest to tallest) evenly spread, both ends included."""
    if count >= len(shapes):
        return list(shapes)
    if count == 1:
        return [shapes[len(shapes) // 2]]
    return [shapes[round(i * (len(shapes) - 1) / (count - 1))] for i in range(count)]


def bucket_batches(bench: Any, shapes: list[tuple[int, int]], rounds: int) -> Iterator[dict[str, Any]]:
    """Loader-style micro-batches, one bucket shape each (uint8 (B, 3, h, w) images with the stage's captions and
    tokens; size conditioning left to the stage's "uncropped" default), shapes in turn, `rounds` times."""
    square = throughput.synthetic_batch(bench.stage, bench.runner.spec, bench.cfg.train.micro_batch_size)
    gen = torch.Generator().manual_seed(0)
    per_shape = []
    for height, width in shapes:
        batch = dict(square)
        batch["image"] = torch.randint(0, 256, (square["image"].shape[0], 3, height, width), dtype=torch.uint8,
                                       generator=gen)
        per_shape.append(batch)
    for _ in range(rounds):
        yield from per_shape


def graphs_captured() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_policy(args: argparse.Namespace, policy: str, dist: Any) -> dict[str, Any]:
    from pipeline.config import load_config
    from pipeline.data.buckets import resolve_shapes
    from pipeline.train import setup

    torch._dynamo.reset()
    compile_on = "off" if policy == "eager" else "on"
    shapes_policy = "dynamic" if policy == "eager" else ("auto" if policy == "default" else policy)
    overrides = [*args.overrides, f"train.compile={compile_on}", f"train.compile_backend={args.backend}",
                 f"train.compile_shapes={shapes_policy}"]
    cfg = load_config(args.config, overrides)
    base = load_config(args.config, args.overrides)
    if not base.data.buckets.enabled:
        raise SystemExit(f"{args.config}: data.buckets.enabled is false; give a bucketed config")
    shapes = spread(resolve_shapes(base.data.buckets, base.data.resolution), args.shapes)
    steps = len(shapes) * args.rounds
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_urls="", num_workers=0),
                              train=dataclasses.replace(cfg.train, max_steps=max(cfg.train.max_steps, steps + 1)))
    with mock.patch.object(setup, "compile_shape_options", lambda cfg: {}) if policy == "default" \
            else contextlib.nullcontext():  # 'default': torch's own behaviour, neither dynamic nor static asked for
        bench = throughput.build(cfg, dist, "synthetic")
    if policy == "default":
        bench.stage.dynamic_size = False  # nor the U-Net stage's marks
    bench.batches = bucket_batches(bench, shapes, args.rounds)
    device = dist.device
    times, compiling = [], []
    for step in range(1, steps + 1):
        before = graphs_captured()
        throughput.sync(device)
        start = time.perf_counter()
        throughput.train_step(bench, step)
        throughput.sync(device)
        times.append(time.perf_counter() - start)
        compiling.append(graphs_captured() > before)
    per_round = len(shapes)
    return {"policy": policy, "shapes": shapes, "steps": steps, "graphs": graphs_captured(),
            "compiling": sum(compiling), "later": sum(compiling[per_round:]),
            "first_round_s": sum(times[:per_round]), "steady_ms": 1e3 * statistics.median(times[-per_round:])}


def row(result: dict[str, Any]) -> str:
    graphs = "-" if result["policy"] == "eager" else str(result["graphs"])
    compiling = "-" if result["policy"] == "eager" else f"{result['compiling']} ({result['later']})"
    return (f"| {result['policy']} | {len(result['shapes'])} | {result['steps']} | {compiling} | {graphs} | "
            f"{result['first_round_s']:.1f} | {result['steady_ms']:.1f} |")


def header(args: argparse.Namespace, device: torch.device) -> str:
    return "\n".join([
        f"## torch.compile with buckets: {args.config}, backend {args.backend}, "
        f"{throughput._device_name(device)}",
        "",
        f"{throughput._versions()}; {time.strftime('%Y-%m-%d')}",
        "",
        "| policy (train.compile_shapes) | shapes | steps | compiling steps (after round 1) | graphs | "
        "first round s | steady ms/step |",
        "|---|---|---|---|---|---|---|"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"a bucketed run config (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", action="extend", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES),
                        help="'default' = torch's own shape handling (torch.compile given no `dynamic`)")
    parser.add_argument("--shapes", type=int, default=5, help="bucket shapes to walk through (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the shapes (default 3)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a CPU check)")
    parser.add_argument("--out", help="also write the table to this file (rewritten after every policy)")
    args = parser.parse_args(argv)
    if args.shapes < 1 or args.rounds < 2:
        parser.error("--shapes must be >= 1 and --rounds >= 2 (later rounds show whether anything recompiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import pipeline  # noqa: F401  (the CPU-torch import fixes before torchvision is imported)
    from pipeline.train.backend import process_group, select_device
    from pipeline.train.launch_env import deepspeed_environment, detect_launch_env

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    with contextlib.suppress(ImportError, AttributeError):
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = False  # each policy compiles from scratch
    env = detect_launch_env()
    lines: list[str] = []
    with deepspeed_environment(env), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        device = select_device(env)
        from pipeline.config import load_config

        with process_group(env, load_config(args.config, args.overrides), device) as dist:
            lines.append(header(args, device))
            print(lines[0], flush=True)
            for policy in args.policies:
                lines.append(row(run_policy(args, policy, dist)))
                print(lines[-1], flush=True)
                if args.out:  # after every policy: a run cut short still leaves what it measured
                    with open(args.out, "w", encoding="utf-8") as out:
                        out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
