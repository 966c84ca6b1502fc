"""Per-rank parameter, gradient and optimizer-state memory at DeepSpeed ZeRO 0/1/2/3 on 1 and 2 ranks, next to
the ZeRO paper's formulas.

    python benchmarks/zero_memory.py                       # fp32 on CPU over gloo: ~4 M-parameter demo U-Net
    python benchmarks/zero_memory.py --worlds 1,2,4 --set model.unet.channels=128 --out zero.md
    python benchmarks/zero_memory.py --precision bf16      # mixed precision (bf16 params/grads, fp32 master)

The script launches one ``torchrun --standalone`` job per world size (``OMP_NUM_THREADS=1``; CUDA hidden unless
``--device cuda``, so the ranks use gloo on CPU even on a GPU machine); each rank builds the engines exactly as the
Trainer does (``build_stage`` -> ``build_training``: the stage's trainable parts, the client AdamW,
``deepspeed.initialize`` with the DeepSpeed JSON generated from the run config) for ZeRO 0, 1, 2, 3 in turn, runs
one optimizer step through ``StepRunner`` (so Adam's moments exist), then one more forward + backward (so the
gradients exist, as at the peak of a step) and measures before that step's ``engine.step``.

What is counted, and where. Every tensor reachable from the engine is collected - the module's parameters and
buffers (under ZeRO-3 each parameter's ``ds_tensor`` partition; ``p.data`` is then an empty placeholder), their
``.grad``, the client optimizer's ``state`` and ``param_groups``, and, walking the attributes of DeepSpeed's ZeRO
optimizer and engine objects (``deepspeed.*`` classes, lists, dicts), every tensor they hold. Each tensor counts the
bytes of its whole storage, once per storage (deduplicated by storage pointer: flat buffers and the views into
them count once, in the first category below that reaches them):

1. params: module parameters (ZeRO-1/2: views into DeepSpeed's flat ``bit16_groups_flat``; ZeRO-3: the
   ``ds_tensor`` partitions, views into ``lp_param_buffer``; persistent small parameters, whole on every rank).
2. optimizer states: ``optimizer.state`` of the client AdamW (exp_avg, exp_avg_sq, step).
3. fp32 master: the tensors the client optimizer updates that are not module parameters (ZeRO >= 1:
   ``single_partition_of_fp32_groups`` / ``fp32_partitioned_groups_flat``; bf16 ZeRO-0: BF16_Optimizer's
   ``fp32_groups_flat_partition``) and any other ``*fp32*`` tensor of the ZeRO optimizer.
4. grads: ``.grad`` of parameters and of master partitions, and ZeRO optimizer attributes named ``*grad*``
   (ZeRO-2 ``grads_in_partition`` / ``averaged_gradients``, ZeRO-3 ``grad_partitions_flat_buffer``).
5. buffers: everything else - reduce/gather buckets (ZeRO-2 ``ipg_buffer``, ZeRO-3 ``__ipg_bucket_flat_buffer``,
   sized by ``reduce_bucket_size``), norms, flags, module buffers. Reported separately, never in the formula.

Predicted per rank, Psi = trainable parameters, N = world size (ZeRO paper, Rajbhandari et al. 2020, section 3):
params Bp*Psi (/N at ZeRO-3), grads Bg*Psi (/N at ZeRO >= 2), optimizer K*Psi (/N at ZeRO >= 1), with
bf16 mixed precision Bp = Bg = 2 and K = 12 (fp32 master 4 + Adam moments 8), and fp32 training Bp = Bg = 4 and
K = 8 (the moments; no master copy is needed). DeepSpeed however keeps an fp32 partition of the parameters for
its optimizer at ZeRO 1-3 even when they are fp32 already, so the fp32 prediction adds that 4*Psi/N master at
ZeRO >= 1 (K = 12, as in the mixed-precision case); the table says which K it used.

ZeRO-3 settings: ``stage3_param_persistence_threshold`` is set to 0 here (``--persistence-threshold``; DeepSpeed's
default is 1e5 elements): at real sizes the parameters below 1e5 elements are a negligible share of the model, but in
a few-million-parameter model they are most of it, and they stay whole on every rank instead of partitioned.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout
sys.path.insert(0, str(HERE))  # sibling: train_throughput (synthetic batches)

import torch  # noqa: E402

DEFAULT_CONFIG = "configs/demo/unet_base.yaml"
DEFAULT_SETS = ("model.unet.channels=64", "train.micro_batch_size=2", "train.ema_decay=0.0", "train.compile=off")
CATEGORIES = ("params", "grads", "optimizer", "master", "buffers")
MiB = 2 ** 20


# ----------------------------------------------------------------------------------------------- the walk
def _walk(obj: Any, path: str, seen: set[int], out: list[tuple[str, torch.Tensor]], depth: int = 0) -> None:
    """Collect (attribute path, tensor) for every tensor reachable through containers and DeepSpeed objects."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        grad = obj.grad if obj.is_leaf else None
        if grad is not None:
            out.append((f"{path}.grad", grad))
        return
    if isinstance(obj, torch.nn.Module):
        return  # the module is walked on its own (parameters, ds_tensor, buffers)
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            _walk(value, f"{path}[{key!r}]" if not isinstance(key, torch.Tensor) else f"{path}[tensor]", seen, out,
                  depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(list(obj)):
            _walk(value, f"{path}[{i}]", seen, out, depth + 1)
    elif type(obj).__module__.startswith("deepspeed") or isinstance(obj, torch.optim.Optimizer):
        try:
            attrs = vars(obj)
        except TypeError:
            return
        for key, value in list(attrs.items()):
            _walk(value, f"{path}.{key}", seen, out, depth + 1)


def _category(path: str) -> str:
    """Category of a tensor found by the generic walk, from its attribute path (see the module docstring)."""
    name = path.lower()
    if "grad" in name:
        return "grads"
    if "fp32" in name:
        return "master"
    return "buffers"


def engine_memory(engine: Any) -> tuple[dict[str, int], dict[str, int]]:
    """({category: bytes}, {path of a buffer storage: bytes}) for one DeepSpeed engine on this rank."""
    module, zero_opt = engine.module, engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)  # DeepSpeed's ZeRO / bf16 wrapper or the client optimizer
    ordered: list[tuple[str, str, torch.Tensor]] = []
    for name, p in module.named_parameters():
        ordered.append(("params", f"module.{name}", p.data))
        if hasattr(p, "ds_tensor"):
            ordered.append(("params", f"module.{name}.ds_tensor", p.ds_tensor))
    for i, state in enumerate(inner.state.values()):
        ordered += [("optimizer", f"optimizer.state[{i}][{k}]", v) for k, v in state.items()
                    if isinstance(v, torch.Tensor)]
    updated = [p for group in inner.param_groups for p in group["params"]]
    ordered += [("master", f"optimizer.param_groups[{i}]", p) for i, p in enumerate(updated)]
    ordered += [("grads", f"module.{n}.grad", p.grad) for n, p in module.named_parameters() if p.grad is not None]
    ordered += [("grads", f"optimizer.param_groups[{i}].grad", p.grad) for i, p in enumerate(updated)
                if p.grad is not None]
    found: list[tuple[str, torch.Tensor]] = []
    seen = {id(inner.state), id(inner.param_groups)}
    _walk(zero_opt, "zero_optimizer", seen, found)
    _walk({k: v for k, v in vars(engine).items() if k not in ("optimizer", "module")}, "engine", seen, found)
    generic = [(_category(path), path, t) for path, t in found]
    ordered += sorted(generic, key=lambda item: CATEGORIES.index(item[0]))  # stable: walk order within a category
    ordered += [("buffers", f"module buffer {n}", b) for n, b in module.named_buffers()]

    totals = dict.fromkeys(CATEGORIES, 0)
    buffers: dict[str, int] = {}
    storages: set[int] = set()
    for category, path, tensor in ordered:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in storages:
            continue
        storages.add(ptr)
        totals[category] += size
        if category == "buffers":
            buffers[path] = size
    return totals, buffers


# -------------------------------------------------------------------------------------------- the formula
def predicted(psi: int, zero: int, world: int, precision: str) -> tuple[dict[str, float], int]:
    """({params, grads, optimizer, master}: bytes per rank, K) from the ZeRO paper (see the docstring)."""
    mixed = precision != "fp32"
    half = 2 if mixed else 4
    params = half * psi / (world if zero >= 3 else 1)
    grads = half * psi / (world if zero >= 2 else 1)
    moments = 8 * psi / (world if zero >= 1 else 1)
    master = (4 * psi / (world if zero >= 1 else 1)) if (mixed or zero >= 1) else 0.0
    k = 12 if master else 8
    return {"params": params, "grads": grads, "optimizer": moments, "master": master}, k


# ------------------------------------------------------------------------------------------------- worker
def _one_stage(base_cfg: Any, dist: Any, zero: int, ds_json: str) -> dict[str, Any]:
    """Build the engines for ZeRO `zero` like the Trainer, one step, one more backward, measure."""
    import dataclasses
    import time

    from pipeline.data.spec import normalize_batch
    from pipeline.train.ds_config import resolve_precision
    from pipeline.train.setup import build_stage, build_training
    from train_throughput import synthetic_batch

    cfg = dataclasses.replace(base_cfg, dist=dataclasses.replace(base_cfg.dist, zero_stage=zero,
                                                                 deepspeed_config=ds_json),
                              train=dataclasses.replace(base_cfg.train, grad_accum_steps=1))
    start = time.perf_counter()
    precision = resolve_precision(cfg.train, dist.device)
    stage = build_stage(cfg, dist, precision, None)
    spec = stage.sample_spec()
    batch = synthetic_batch(stage, spec, cfg.train.micro_batch_size, seed=dist.rank)
    training = build_training(cfg, dist, precision, stage, spec)
    built, runner = training.built, training.runner
    runner.run(itertools.repeat(batch), cfg.optim.lr, False)  # creates the optimizer state
    normalised = normalize_batch(batch, spec, dist.device, precision.dtype)
    result: dict[str, Any] = {"zero": zero, "precision": precision.name, "parts": {}}
    for name, part in built.parts.items():  # forward + backward: gradients held, before engine.step
        out = stage.training_step(runner.models[name], built.frozen, normalised, name)
        part.engine.backward(out.loss)
        totals, buffers = engine_memory(part.engine)
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in part.module.parameters() if p.requires_grad)
        result["parts"][name] = {"psi": psi, "totals": totals,
                                 "buffers": dict(sorted(buffers.items(), key=lambda kv: -kv[1])[:4])}
        part.engine.step()
    result["seconds"] = time.perf_counter() - start
    return result


def worker(args: argparse.Namespace) -> int:
    """One rank of one world size: every ZeRO stage in turn; rank 0 writes every rank's figures to --json."""
    import logging
    import warnings

    import pipeline  # noqa: F401  (CPU-torch compatibility fix first)
    from pipeline.config import load_config
    from pipeline.train.backend import process_group, select_device
    from pipeline.train.launch_env import deepspeed_environment, detect_launch_env

    overrides = [*DEFAULT_SETS, *args.overrides]
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    cfg = load_config(args.config, overrides)
    env = detect_launch_env()
    with tempfile.TemporaryDirectory() as tmp, deepspeed_environment(env), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.ERROR)
        ds_json = os.path.join(tmp, "zero.json")
        with open(ds_json, "w", encoding="utf-8") as out:
            json.dump({"zero_optimization": {"stage3_param_persistence_threshold": args.persistence_threshold}},
                      out)
        device = select_device(env)
        with process_group(env, cfg, device) as dist:
            rows = [_one_stage(cfg, dist, zero, ds_json) for zero in args.stages]
            everyone = dist.gather_objects(rows)
            if dist.rank == 0:
                Path(args.json).write_text(json.dumps({"world": dist.world_size, "ranks": everyone}), "utf-8")
            dist.barrier()
    return 0


# ----------------------------------------------------------------------------------------------- launcher
def launch(args: argparse.Namespace, world: int, json_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun) if torchrun.exists() else sys.executable, *([] if torchrun.exists() else
               ["-m", "torch.distributed.run"]), "--standalone", f"--nproc_per_node={world}", str(Path(__file__)),
               "--worker", "--json", str(json_path), "--config", args.config,
               "--stages", ",".join(map(str, args.stages)), "--persistence-threshold",
               str(args.persistence_threshold)]
    command += ["--precision", args.precision] if args.precision else []
    command += [a for o in args.overrides for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even on a GPU machine (2 ranks cannot share one GPU with NCCL)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"world size {world} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def table(args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    import deepspeed

    first = results[0]["ranks"][0][0]
    part = next(iter(first["parts"]))
    psi, precision = first["parts"][part]["psi"], first["precision"]
    where = "CPU over gloo" if args.device == "cpu" else "CUDA"
    lines = [f"### ZeRO memory per rank: {args.config} {' '.join(DEFAULT_SETS + tuple(args.overrides))}", "",
             f"{datetime.date.today()}, {where} (DeepSpeed {deepspeed.__version__}, torch {torch.__version__}), "
             f"part {part!r}: Psi = {psi / 1e6:.3f} M trainable parameters, {precision}, "
             f"stage3_param_persistence_threshold {args.persistence_threshold}. MiB per rank, rank 0 "
             "(measured / predicted); 'spread' is the largest difference of a rank's total from rank 0's.", "",
             "| ranks | ZeRO | params | grads | optimizer states (Adam moments) | fp32 master | K | "
             "total measured | total predicted | measured / predicted | buffers | spread |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        world = result["world"]
        for index, row in enumerate(result["ranks"][0]):
            entry = row["parts"][part]
            got = entry["totals"]
            pred, k = predicted(entry["psi"], row["zero"], world, row["precision"])
            cells = [f"{got[c] / MiB:.2f} / {pred[c] / MiB:.2f}" for c in ("params", "grads", "optimizer", "master")]
            measured = sum(got[c] for c in pred)
            expected = sum(pred.values())
            others = [sum(r[index]["parts"][part]["totals"][c] for c in pred) for r in result["ranks"]]
            spread = max(abs(o - measured) for o in others)
            lines.append(f"| {world} | {row['zero']} | " + " | ".join(cells) + f" | {k} | {measured / MiB:.2f} | "
                         f"{expected / MiB:.2f} | {measured / expected:.3f} | {got['buffers'] / MiB:.2f} | "
                         f"{spread / MiB:.2f} |")
    lines += ["", "Seconds per ZeRO stage on rank 0 (build, one step, one backward, measure): " + "; ".join(
        f"{r['world']} rank(s) " + ", ".join(f"ZeRO-{row['zero']} {row['seconds']:.0f}" for row in r["ranks"][0])
        + f" (job {r['job_seconds']:.0f} s with start-up)" for r in results)]
    lines += ["", "Largest buffer storages (rank 0, last world size): " + "; ".join(
        f"ZeRO-{row['zero']}: " + ", ".join(f"{path} {size / MiB:.1f} MiB" for path, size in
                                           row["parts"][part]["buffers"].items())
        for row in results[-1]["ranks"][0])]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="extend", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help=f"config overrides after the defaults {' '.join(DEFAULT_SETS)}")
    parser.add_argument("--worlds", default="1,2", help="world sizes, comma separated")
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages, comma separated")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: the config's (auto)")
    parser.add_argument("--persistence-threshold", type=int, default=0,
                        help="ZeRO-3 stage3_param_persistence_threshold in elements (DeepSpeed default 100000)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default): gloo, CUDA hidden; cuda: one GPU per rank (world size <= GPUs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per torchrun job")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.stages = [int(s) for s in str(args.stages).split(",")]
    args.worlds = [int(w) for w in str(args.worlds).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            path = Path(tmp) / f"world{world}.json"
            start = time.perf_counter()
            launch(args, world, path)
            results.append(json.loads(path.read_text(encoding="utf-8")))
            results[-1]["job_seconds"] = time.perf_counter() - start
    text = table(args, results)
    print(text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
