"""Training throughput of the real Trainer step: samples/s, the step split into phases, model FLOPs and MFU.

    python benchmarks/train_throughput.py                                   # CPU: small mode, the demo base U-Net
    python benchmarks/train_throughput.py --config configs/unet/base64.yaml --set model.text_source=precomputed \\
        model.attention=triton train.precision=bf16 --steps 20 --warmup 5   # GPU: the 64 px base U-Net
    torchrun --standalone --nproc_per_node 8 benchmarks/train_throughput.py --config ... --out results.md

What runs is what `python -m pipeline train` runs per optimizer step: the stage built from the config
(``build_stage``), its frozen helpers and one DeepSpeed engine per trainable part with the client AdamW
(``build_training``, as the Trainer builds them), and ``StepRunner.run`` (micro-batches, ``stage.training_step``,
``engine.backward``, the collective skip decision, ``engine.step``), plus the EMA update the Trainer makes after
an applied step. Checkpoints, evaluation and logging are not part of it.

Data: ``--data synthetic`` (default) repeats one fixed batch of random uint8 images with the stage's tokenized
captions and random precomputed arrays of the right shapes (T5 tokens + mask, latents, CLIP embeddings), so loading
costs nothing (the uint8 -> device normalisation still runs, as in training); ``--data shards`` reads data.urls
through the real loader (data wait is then the loader's).

Figures (rank 0 prints; global samples/s under torchrun):

- samples/s: one pass of ``--steps`` steps after ``--warmup`` steps, timed end to end with no extra
  synchronisation (a barrier and a device sync only before and after the pass).
- phase split: a second pass that synchronises the device around ``stage.training_step`` (forward: frozen helpers,
  network, loss), ``engine.backward``, ``engine.step`` (optimizer: ZeRO reductions/gathers, clipping, AdamW) and
  the EMA update; data wait is the time spent in ``next(loader)``; "other" is the rest of the step (host->device
  normalisation, the skip-decision all-reduce, bookkeeping). Medians over the pass. The syncs slow it a little.
- communication: in the same pass, time inside DeepSpeed's and torch.distributed's collectives (asynchronous ones
  are waited for at once, so this is their serial cost, part of the backward/optimizer figures); n/a at world 1.
- model FLOPs per sample: ``torch.utils.flop_counter.FlopCounterMode`` around one forward + backward of the stage's
  training step on a separate copy of the trainable parts with ``attention: sdpa`` and SDPA's math backend (fused
  attention kernels and custom ops such as the Triton kernels are invisible to the counter) and without
  activation checkpointing (model FLOPs, no recomputation). Frozen helpers that run inside the step (T5, an
  autoencoder encoding the batch) are included. Not estimated by hand.
- MFU: achieved model FLOP/s per device against (a) a large matmul measured in the same run (bf16 8192^3 on GPU,
  fp32 1024^3 on CPU) and (b) the spec-sheet dense bf16 peak (H100 SXM / H200: 989 TFLOP/s; n/a on CPU).
- peak memory: ``torch.cuda.max_memory_allocated`` over the timed pass on GPU, the process's peak RSS on CPU.

Small CPU mode (``--cpu-small``, automatic without CUDA): 3 steps after 1 warm-up, micro-batch at most 8, data
workers 0 and one torch thread per process unless OMP_NUM_THREADS is set, so anyone can run it in well under a
minute; its numbers only show that the path works.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import inspect
import itertools
import logging
import os
import platform
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_CONFIG = "configs/demo/unet_base.yaml"
SPEC_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
                    ("A100", 312.0))  # dense bf16, spec sheets; first substring match wins
CAPTIONS = ("a large red circle on the left and a small blue square on the right",
            "a small green triangle at the top", "two yellow stars", "a purple square below a large orange circle")
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor", "all_gather_base",
               "all_gather_coalesced", "broadcast", "all_to_all_single", "all_gather_object")


# ------------------------------------------------------------------------------------------------ inputs
def synthetic_batch(stage: Any, spec: Any, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """One loader-style batch (uint8 images, captions, keys, tokens, precomputed arrays) for `stage`.

    Array shapes come from the stage's model config: "t5_emb" float16 (B, L, D) zero at padding and "t5_mask" bool
    (B, L) with random lengths (L = text_encoder.max_length, D = the T5 width), "latent" float16 (B, *stage.grid),
    "clip_image_emb" float32 (B, image_embed.dim), L2-normalised.
    """
    gen = torch.Generator().manual_seed(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    batch: dict[str, Any] = {"caption": captions, "key": [f"synthetic{i:06d}" for i in range(batch_size)]}
    if spec.image_size:
        size = spec.image_size
        batch["image"] = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=gen)
    if spec.tokenize is not None:
        batch.update(spec.tokenize(captions))
    for name in spec.precomputed:
        batch[name] = _random_array(stage, name, batch_size, gen)
    if "t5_emb" in batch and "t5_mask" in batch:
        batch["t5_emb"] = batch["t5_emb"] * batch["t5_mask"][..., None]
    return batch


def _random_array(stage: Any, name: str, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    mcfg = stage.cfg.model
    if name in ("t5_emb", "t5_mask"):
        from pipeline.stages.unet_config import text_encoder_dim

        length = mcfg.text_encoder.max_length
        if name == "t5_mask":
            lengths = torch.randint(1, length + 1, (batch_size,), generator=gen)
            return torch.arange(length)[None, :] < lengths[:, None]
        return torch.randn(batch_size, length, text_encoder_dim(mcfg.text_encoder), generator=gen).half()
    if name == "latent":
        return torch.randn(batch_size, *stage.grid, generator=gen).half()
    if name == "clip_image_emb" and getattr(getattr(mcfg, "image_embed", None), "dim", 0):
        emb = torch.randn(batch_size, mcfg.image_embed.dim, generator=gen)
        return emb / emb.norm(dim=1, keepdim=True)
    raise SystemExit(f"--data synthetic does not know the shape of the precomputed array {name!r} of stage "
                     f"{stage.cfg.stage!r}; use --data shards with data.urls and data.precomputed_urls")


# ----------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates synchronised wall time of wrapped callables per phase (the split pass)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start
        return timed

    def take(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals


class CommTimer:
    """Time, calls and bytes inside collectives: DeepSpeed's comm backend (every ZeRO reduce/gather goes through
    ``deepspeed.comm.comm.cdb``) and the torch.distributed functions the Trainer calls itself. Nested calls (the
    backend calling torch.distributed) count once; asynchronous ones are waited for before the clock stops."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.depth = device, 0
        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        self._undo: list[Callable[[], None]] = []

    def _wrap(self, name: str, fn: Callable) -> Callable:
        signature = _signature(name, fn)

        @functools.wraps(fn)  # keeps the signature visible to _signature of the wrappers installed after this one
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            sync(self.device)
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                bound = _arguments(signature, args, kwargs)
                if bound.get("async_op") and hasattr(result, "wait"):
                    result.wait()
                sync(self.device)
                self.bytes += _payload_bytes(bound)
                return result
            finally:
                self.depth -= 1
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed

    def install(self) -> None:
        import torch.distributed as tdist
        from deepspeed.comm import comm as ds_comm

        targets = [(tdist, name) for name in ("all_reduce", "all_gather_object", "broadcast", "barrier")]
        if ds_comm.cdb is not None:
            targets += [(ds_comm.cdb, name) for name in COLLECTIVES if hasattr(ds_comm.cdb, name)]
        for owner, name in targets:
            original = getattr(owner, name)
            own = isinstance(owner, types.ModuleType) or name in vars(owner)  # else a method of its class
            setattr(owner, name, self._wrap(name, original))
            self._undo.append(functools.partial(setattr, owner, name, original) if own
                              else functools.partial(delattr, owner, name))

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def take(self) -> tuple[float, int, int]:
        out = (self.seconds, self.calls, self.bytes)
        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        return out


def _signature(name: str, fn: Callable) -> inspect.Signature | None:
    """Parameter names of a collective. DeepSpeed's backend methods are wrapped in decorators that hide them behind
    (*args, **kwargs) but take torch.distributed's parameters in its order, so those are used instead."""
    import torch.distributed as tdist

    for candidate in (fn, getattr(tdist, name, None), getattr(tdist, f"_{name}", None)):
        try:
            signature = inspect.signature(inspect.unwrap(candidate)) if candidate is not None else None
        except (TypeError, ValueError):
            continue
        if signature is not None and not any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
            return signature
    return None


def _arguments(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    if signature is None:
        return dict(kwargs)
    try:
        return dict(signature.bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def _payload_bytes(arguments: Mapping[str, Any]) -> int:
    """Bytes a rank contributes to a collective: its input tensor (or tensors), else the first tensor given."""
    for key in ("tensor", "input_tensor", "input", "tensors", "input_tensors", "input_tensor_list", "input_list"):
        value = arguments.get(key)
        tensors = value if isinstance(value, (list, tuple)) else [value]
        if tensors and all(isinstance(t, torch.Tensor) for t in tensors):
            return sum(int(t.numel() * t.element_size()) for t in tensors)
    first = next((v for v in arguments.values() if isinstance(v, torch.Tensor)), None)
    return 0 if first is None else int(first.numel() * first.element_size())


@contextmanager
def instrumented(stage: Any, parts: Mapping[str, Any], emas: Mapping[str, Any], phases: PhaseTimer,
                 comm: CommTimer | None) -> Iterator[None]:
    """Shadow stage.training_step, engine.backward/step and EMA.update with timed versions (instance attributes,
    removed afterwards), and the collectives when `comm` is given."""
    shadowed: list[tuple[Any, str]] = [(stage, "training_step")]
    stage.training_step = phases.wrap("forward", stage.training_step)
    for part in parts.values():
        for attr, phase in (("backward", "backward"), ("step", "optimizer")):
            object.__setattr__(part.engine, attr, phases.wrap(phase, getattr(part.engine, attr)))
            shadowed.append((part.engine, attr))
    for ema in emas.values():
        object.__setattr__(ema, "update", phases.wrap("ema", ema.update))
        shadowed.append((ema, "update"))
    if comm is not None:
        comm.install()
    try:
        yield
    finally:
        if comm is not None:
            comm.uninstall()
        for owner, attr in shadowed:
            object.__delattr__(owner, attr)


# ------------------------------------------------------------------------------------------------ FLOPs
def count_step_flops(stage: Any, modules: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                     batch: dict[str, Any]) -> int:
    """FLOPs of one forward + backward of `stage.training_step` on `batch` (already normalised) for every part in
    order, counted by FlopCounterMode with SDPA's math backend (its fused kernels are not counted on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        for name in modules:
            others = [p for other, m in modules.items() if other != name for p in m.parameters() if p.requires_grad]
            for p in others:
                p.requires_grad_(False)
            try:
                out = stage.training_step(modules, frozen, batch, name)
                out.loss.backward()
            finally:
                for p in others:
                    p.requires_grad_(True)
    for module in modules.values():
        module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def model_flops_per_sample(cfg: Any, dist: Any, precision: Any, frozen: Mapping[str, nn.Module],
                           batch: dict[str, Any], samples: int) -> int:
    """Build a fresh copy of the trainable parts (attention sdpa, no activation checkpointing) and count one
    training step's FLOPs on the first `samples` samples of `batch`; per sample."""
    from pipeline.train import rng
    from pipeline.train.setup import build_stage

    model = cfg.model
    if dataclasses.is_dataclass(model) and "attention" in {f.name for f in dataclasses.fields(model)}:
        model = dataclasses.replace(model, attention="sdpa")
    counting = dataclasses.replace(cfg, model=model,
                                   train=dataclasses.replace(cfg.train, activation_checkpointing=False))
    with rng.isolated():
        stage = build_stage(counting, dist, precision, None)
        stage.sample_spec()
        with torch.device(dist.device):  # initialised where it runs (random init of ~1 B parameters is slow on CPU)
            built = stage.build_trainable()
        modules = {name: nn.Module.to(m, dtype=precision.dtype).train() for name, m in built.items()}  # not diffusers'
        del built
        head = {k: v[:samples] for k, v in batch.items()}
        total = count_step_flops(stage, modules, frozen, head)
    del modules
    return total // samples


# ---------------------------------------------------------------------------------------------- ceilings
def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Measured matmul TFLOP/s (median): bf16 8192^3 with CUDA events on GPU, fp32 1024^3 wall clock on CPU."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(reps + 3):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            elapsed = time.perf_counter() - t0
        if i >= 3:  # warm-up
            times.append(elapsed)
    label = f"{'bf16' if cuda else 'fp32'} {n}^3, median of {reps}"
    return 2.0 * n ** 3 / statistics.median(times) / 1e12, label


def spec_peak(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in SPEC_BF16_TFLOPS:
        if key in name:
            return tflops, f"{name}: dense bf16 spec sheet"
    return None, f"n/a (no spec-sheet figure for {name})"


# --------------------------------------------------------------------------------------------- measuring
@dataclasses.dataclass
class Bench:
    """Everything the timed passes need (built by the Trainer's own pipeline.train.setup.build_training)."""

    cfg: Any
    dist: Any
    precision: Any
    stage: Any
    runner: Any
    parts: dict
    frozen: dict
    emas: dict
    batches: Iterator
    first_batch: dict


def build(cfg: Any, dist: Any, data: str) -> Bench:
    from pipeline.train import rng
    from pipeline.train.ds_config import resolve_precision
    from pipeline.train.setup import build_stage, build_training, default_data_sources, open_inputs

    precision = resolve_precision(cfg.train, dist.device)
    stage = build_stage(cfg, dist, precision, None)
    spec = stage.sample_spec()
    if data == "shards":
        batches = iter(open_inputs(cfg, stage, spec, default_data_sources(), dist).train)
        with rng.isolated():
            first = next(batches)
        batches = itertools.chain([first], batches)
    else:
        first = synthetic_batch(stage, spec, cfg.train.micro_batch_size, seed=dist.rank)
        batches = itertools.repeat(first)
    training = build_training(cfg, dist, precision, stage, spec)
    built = training.built
    return Bench(cfg, dist, precision, stage, training.runner, built.parts, built.frozen, built.emas, batches, first)


def train_step(bench: Bench, step: int) -> Any:
    """One optimizer step exactly as Trainer._loop makes it (StepRunner.run + the EMA of applied parts)."""
    from pipeline.train.schedule import lr_at

    outcome = bench.runner.run(bench.batches, lr_at(step, bench.cfg.optim, bench.cfg.train.max_steps), False)
    for name, applied in outcome.applied.items():
        if applied and name in bench.emas:
            bench.emas[name].update()
    return outcome


def measure(bench: Bench, steps: int, warmup: int, flop_samples: int) -> dict[str, Any]:
    from pipeline.data.spec import normalize_batch
    from pipeline.train.metrics import max_memory_bytes

    dist, device = bench.dist, bench.dist.device
    for step in range(1, warmup + 1):
        train_step(bench, step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    sync(device)
    start = time.perf_counter()
    for step in range(warmup + 1, warmup + steps + 1):
        train_step(bench, step)
    sync(device)
    dist.barrier()
    wall = time.perf_counter() - start
    memory = dist.gather_objects(max_memory_bytes(device))

    phases = PhaseTimer(device)
    comm = CommTimer(device) if dist.world_size > 1 else None
    rows: list[dict[str, float]] = []
    with instrumented(bench.stage, bench.parts, bench.emas, phases, comm):
        for step in range(warmup + steps + 1, warmup + 2 * steps + 1):
            sync(device)
            t0 = time.perf_counter()
            outcome = train_step(bench, step)
            sync(device)
            row = {"step": time.perf_counter() - t0, "data": outcome.data_wait_s, **phases.take()}
            if comm is not None:
                row["comm"], row["comm_calls"], row["comm_bytes"] = comm.take()
            rows.append(row)
    split = {key: statistics.median(r.get(key, 0.0) for r in rows) for key in rows[0]}
    split["other"] = split["step"] - sum(split.get(k, 0.0) for k in ("data", "forward", "backward", "optimizer", "ema"))

    batch = normalize_batch(bench.first_batch, bench.runner.spec, device, bench.precision.dtype)
    flops = model_flops_per_sample(bench.cfg, dist, bench.precision, bench.frozen, batch,
                                   min(flop_samples, bench.cfg.train.micro_batch_size))
    peak, peak_label = matmul_peak(device)
    return {"wall": wall, "steps": steps, "memory": memory, "split": split, "flops": flops,
            "peak": peak, "peak_label": peak_label}


# ---------------------------------------------------------------------------------------------- reporting
def _versions() -> str:
    import deepspeed
    import diffusers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return (f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, diffusers {diffusers.__version__}, "
            f"triton {triton_version}, python {platform.python_version()}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    load = ", load average %.1f / %.1f / %.1f (1/5/15 min)" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"CPU ({model}, {os.cpu_count()} cores{load}; {torch.get_num_threads()} torch thread(s) per rank)"


def _fast_path(cfg: Any, device: torch.device) -> str:
    """attention backend, train.compile and fused AdamW as the run resolved them (config fields absent in older
    checkouts read as off)."""
    def switch(setting: str) -> bool:
        return setting == "on" or (setting == "auto" and device.type == "cuda")

    compiled = switch(getattr(cfg.train, "compile", "off")) and cfg.dist.zero_stage != 3
    fused = switch(getattr(cfg.optim, "fused", "off")) and not cfg.dist.offload_optimizer
    backend = getattr(cfg.train, "compile_backend", "inductor")
    attention = getattr(cfg.model, "attention", "n/a")
    return (f"attention {attention}, compile {f'on ({backend})' if compiled else 'off'}, "
            f"fused AdamW {'on' if fused else 'off'}, activation checkpointing "
            f"{'on' if cfg.train.activation_checkpointing else 'off'}")


def _si(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def table(args: argparse.Namespace, bench: Bench, result: dict[str, Any]) -> str:
    """The Markdown table (one figure per row)."""
    cfg, dist, device = bench.cfg, bench.dist, bench.dist.device
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    global_rate = per_step * dist.world_size * result["steps"] / result["wall"]
    rank_rate = global_rate / dist.world_size
    split, flops = result["split"], result["flops"]
    achieved = flops * rank_rate / 1e12
    spec, spec_label = spec_peak(device)
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                 for part in bench.parts.values() for p in part.module.parameters())
    ms = lambda key: f"{1e3 * split.get(key, 0.0):.1f}"  # noqa: E731
    comm = "n/a (world size 1)"
    if "comm" in split:
        comm = (f"{1e3 * split['comm']:.1f} ms/step in {split['comm_calls']:.0f} calls, "
                f"{split['comm_bytes'] / 2**20:.1f} MiB/step sent (rank 0; inside backward/optimizer)")
    mem_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process"
    memory = result["memory"]
    rows = [
        ("device", _device_name(device)),
        ("versions", _versions()),
        ("date", str(datetime.date.today())),
        ("config", " ".join([args.config, *[f"--set {o}" for o in args.overrides]])),
        ("stage / trainable parameters", f"{cfg.stage}: {params / 1e6:.2f} M in {', '.join(bench.parts)}"),
        ("precision", bench.precision.name),
        ("batch", f"micro {cfg.train.micro_batch_size} x accum {cfg.train.grad_accum_steps} x world "
                  f"{dist.world_size} = {per_step * dist.world_size} samples/step"),
        ("ZeRO stage", str(cfg.dist.zero_stage)),
        ("fast path", _fast_path(cfg, device)),
        ("world size", str(dist.world_size)),
        ("data", "synthetic (one fixed batch, repeated)" if args.data == "synthetic" else f"shards {cfg.data.urls}"),
        ("steps timed", f"{result['steps']} after {args.warmup} warm-up"),
        ("samples/s (global)", f"{global_rate:.4g}"),
        ("samples/s per rank", f"{rank_rate:.4g}"),
        ("step time (ms, mean, no extra syncs)", f"{1e3 * result['wall'] / result['steps']:.1f}"),
        ("split pass step time (ms, median, synchronised)", ms("step")),
        ("data wait (ms)", ms("data")),
        ("forward (ms): stage.training_step", ms("forward")),
        ("backward (ms): engine.backward", ms("backward")),
        ("optimizer (ms): engine.step", ms("optimizer")),
        ("EMA update (ms)", ms("ema") if bench.emas else "n/a (no EMA)"),
        ("other (ms): normalise, skip decision, bookkeeping", ms("other")),
        ("communication", comm),
        ("model FLOPs per sample (fwd+bwd)", f"{flops} ({_si(flops)}FLOP; FlopCounterMode, sdpa math, custom ops not "
                                             "counted)"),
        ("achieved model TFLOP/s per device", f"{achieved:.4g}"),
        ("matmul peak measured (TFLOP/s)", f"{result['peak']:.4g} ({result['peak_label']})"),
        ("MFU vs measured matmul", f"{100 * achieved / result['peak']:.2f} %"),
        ("spec-sheet peak (TFLOP/s)", f"{spec:.0f} ({spec_label})" if spec else spec_label),
        ("MFU vs spec sheet", f"{100 * achieved / spec:.2f} %" if spec else "n/a"),
        ("peak memory (GiB)", f"{memory[0] / 2**30:.2f} rank 0, {max(memory) / 2**30:.2f} max over ranks "
                              f"({mem_kind})"),
    ]
    lines = [f"### Training throughput: {args.config}", "", "| figure | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += ["", "The phase split comes from a second pass that synchronises the device around every phase and "
                  "collective; samples/s comes from a pass without those syncs."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"run config YAML (default {DEFAULT_CONFIG})")
    parser.add_argument("--set", action="extend", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config overrides, as for python -m pipeline train")
    parser.add_argument("--data", choices=("synthetic", "shards"), default="synthetic")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20; small: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; small: 1)")
    parser.add_argument("--flop-samples", type=int, default=2, help="samples of the FLOP-counting step")
    parser.add_argument("--random-autoencoder", metavar="AE_CONFIG",
                        help="latent stages: build a random-weight autoencoder folder with the architecture of this "
                             "autoencoder run config (e.g. configs/autoencoder/kl_f8.yaml) and use it as "
                             "model.autoencoder (it is only loaded; with precomputed latents it never runs)")
    parser.add_argument("--cpu-small", action="store_true", help="small CPU mode (automatic without CUDA)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    args.small = args.cpu_small or not torch.cuda.is_available()
    args.steps = args.steps if args.steps is not None else (3 if args.small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def random_autoencoder(config: str) -> str:
    """A temporary exported-autoencoder folder (diffusers config.json + safetensors, random weights, seed 0) with
    the architecture and image size of the autoencoder run config `config`; removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    from diffusers import AutoencoderKL, VQModel

    from pipeline.config import load_config
    from pipeline.models.autoencoder import diffusers_kwargs
    from pipeline.train import rng

    ae_cfg = load_config(config)
    if ae_cfg.stage != "autoencoder":
        raise SystemExit(f"--random-autoencoder {config}: a {ae_cfg.stage!r} config, not an autoencoder config")
    arch = ae_cfg.model.autoencoder
    folder = tempfile.mkdtemp(prefix="random_autoencoder_")
    atexit.register(shutil.rmtree, folder, True)
    with rng.isolated():
        torch.manual_seed(0)
        vae = (AutoencoderKL if arch.kind == "kl" else VQModel)(**diffusers_kwargs(arch, ae_cfg.data.resolution))
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def load(args: argparse.Namespace) -> Any:
    """The run config with --set applied; small mode caps the micro-batch and loads data in-process."""
    from pipeline.config import load_config

    overrides = list(args.overrides)
    if args.random_autoencoder:
        overrides.append(f"model.autoencoder={random_autoencoder(args.random_autoencoder)}")
    cfg = load_config(args.config, overrides)
    data = dataclasses.replace(cfg.data, eval_urls="", eval_precomputed_urls="")
    train = dataclasses.replace(cfg.train, max_steps=max(cfg.train.max_steps, args.warmup + 2 * args.steps))
    if args.small:
        data = dataclasses.replace(data, num_workers=0)
        train = dataclasses.replace(train, micro_batch_size=min(train.micro_batch_size, 8))
    return dataclasses.replace(cfg, data=data, train=train)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import pipeline  # noqa: F401  (applies the CPU-torch compatibility fix before torchvision is imported)
    from pipeline.train.backend import process_group, select_device
    from pipeline.train.launch_env import deepspeed_environment, detect_launch_env

    if args.small and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # One thread per process: on a CPU shared with other jobs, two OpenMP threads spinning at every barrier
        # made this small U-Net's step ~20x slower than one thread (5.4 s vs 0.24 s, load average 4.5 on 2 cores).
        torch.set_num_threads(1)
    cfg = load(args)
    env = detect_launch_env()
    with deepspeed_environment(env), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING if env.rank == 0 else logging.ERROR)  # as `pipeline train` does
        device = select_device(env)
        with process_group(env, cfg, device) as dist:
            bench = build(cfg, dist, args.data)
            result = measure(bench, args.steps, args.warmup, args.flop_samples)
            if dist.rank == 0:
                text = table(args, bench, result)
                print(text, flush=True)
                if args.out:
                    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                    with open(args.out, "w", encoding="utf-8") as out:
                        out.write(text)
            bench.dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
