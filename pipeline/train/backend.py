"""The DeepSpeed backend: process group, collectives with a timeout, one engine per trainable part.

One code path for every setting: a single CPU process (world 1, gloo), several CPU processes (gloo) and
multi-node GPUs (NCCL). torch.distributed is always initialised, by us, with an explicit rendezvous URL and
``dist.timeout_s``, so a dead rank makes the next collective fail with an error instead of hanging forever.
"""
from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from pipeline.config import Config
from pipeline.errors import PipelineError, UsageError
from pipeline.train.ds_compat import scalar_parameters_supported
from pipeline.train.launch_env import LaunchEnv


class CollectiveError(PipelineError):
    """A collective failed or timed out: another rank died, hangs, or the network failed."""


def select_device(env: LaunchEnv) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (and made current), else cpu."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Dist:
    """The process group and the few collectives the Trainer needs (all ranks must call them in the same order).

    Failures (including the gloo/NCCL timeout set from ``dist.timeout_s``) become :class:`CollectiveError`
    with a message that says what probably happened.
    """

    def __init__(self, env: LaunchEnv, device: torch.device, backend: str, timeout_s: int) -> None:
        self.rank, self.world_size, self.device = env.rank, env.world_size, device
        self.backend, self.timeout_s = backend, timeout_s

    def _fail(self, what: str, exc: BaseException) -> CollectiveError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CollectiveError(f"rank {self.rank}/{self.world_size}: collective '{what}' failed ({first}); another "
                               f"rank probably died or stalled for longer than dist.timeout_s={self.timeout_s} s")

    def translate(self, exc: BaseException, where: str) -> BaseException:
        """A collective failure raised inside DeepSpeed/torch (timeout, dead peer) as a CollectiveError; any other
        exception unchanged."""
        text = str(exc).lower()
        hints = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "nccl", "gloo")
        if self.world_size > 1 and (isinstance(exc, tdist.DistError) or any(h in text for h in hints)):
            return self._fail(where, exc)
        return exc

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max of a short list of numbers over ranks (float64 on the wire)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        reduce_op = tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM
        try:
            tdist.all_reduce(tensor, op=reduce_op)
        except (RuntimeError, tdist.DistBackendError) as exc:
            raise self._fail(f"all_reduce({op})", exc) from None
        return tensor.tolist()

    def all_reduce_tensor(self, tensor: torch.Tensor, op: str = "max") -> torch.Tensor:
        """In-place max/sum of a device tensor (avoids a host sync before the reduction)."""
        if self.world_size > 1:
            reduce_op = tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM
            try:
                tdist.all_reduce(tensor, op=reduce_op)
            except (RuntimeError, tdist.DistBackendError) as exc:
                raise self._fail(f"all_reduce({op})", exc) from None
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable, small), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        try:
            tdist.all_gather_object(out, obj)
        except (RuntimeError, tdist.DistBackendError) as exc:
            raise self._fail("all_gather_object", exc) from None
        return out

    def barrier(self, what: str = "barrier") -> None:
        if self.world_size == 1:
            return
        try:
            # A tiny all_reduce instead of tdist.barrier(): it honours the process-group timeout on every
            # backend and never guesses a device for NCCL.
            tdist.all_reduce(torch.zeros(1, device=self.device))
        except (RuntimeError, tdist.DistBackendError) as exc:
            raise self._fail(what, exc) from None


@contextmanager
def process_group(env: LaunchEnv, cfg: Config, device: torch.device) -> Iterator[Dist]:
    """Initialise torch.distributed (and DeepSpeed's comm layer over it) for one run; tear down after."""
    import deepspeed

    backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
    owned = not tdist.is_initialized()
    if owned:
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        check_master_resolves(env)
        try:
            tdist.init_process_group(backend, init_method=env.init_method, rank=env.rank,
                                     world_size=env.world_size, timeout=timeout, **kwargs)
        except (RuntimeError, ValueError, TimeoutError) as exc:  # DistStoreError/DistNetworkError, gloo connect
            raise _no_group(env, cfg.dist.timeout_s, exc) from None
    elif tdist.get_world_size() != env.world_size:
        raise PipelineError(f"torch.distributed is already initialised with world size {tdist.get_world_size()}, "
                            f"but the launch environment says {env.world_size}")
    # DeepSpeed wraps the existing process group (it does not create a second one).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    _subgroups_inherit_timeout(timeout)
    completed = False
    try:
        yield Dist(env, device, backend, cfg.dist.timeout_s)
        completed = True
    finally:
        if backend == "gloo":
            release_gloo_tensors(device, handshake=completed)
        if owned and tdist.is_initialized():
            tdist.destroy_process_group()


def _no_group(env: LaunchEnv, timeout_s: int, exc: BaseException) -> CollectiveError:
    """The process group did not form: too few processes for WORLD_SIZE, or MASTER_ADDR:MASTER_PORT unreachable."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CollectiveError(
        f"rank {env.rank}/{env.world_size}: no process group at {env.master_addr}:{env.master_port} within "
        f"dist.timeout_s={timeout_s} s ({type(exc).__name__}: {first}); start all {env.world_size} processes "
        f"({env.world_size_source}) and check that every node reaches MASTER_ADDR:MASTER_PORT")


def check_master_resolves(env: LaunchEnv) -> None:
    """A MASTER_ADDR that does not resolve fails now with its name, not after dist.timeout_s of connect retries."""
    if env.world_size == 1:
        return
    try:
        socket.getaddrinfo(env.master_addr, env.master_port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UsageError(f"rank {env.rank}/{env.world_size}: MASTER_ADDR={env.master_addr} (from {env.launcher}) "
                         f"does not resolve ({exc.strerror or exc}); set it to an address of the first node that "
                         "every node can reach") from None


GLOO_RELEASE_TIMEOUT_S = 5.0
GLOO_GRACE_S = 0.05


def release_gloo_tensors(device: torch.device, handshake: bool) -> None:
    """Let gloo's worker threads drop their last tensor references before this process can start to exit.

    Why: DeepSpeed keeps the process groups alive until the interpreter ends, and a gloo worker releases a finished
    collective's tensor only after reporting it complete; if Python already dropped that tensor, the worker must
    take the GIL, and during interpreter finalization that ends the thread inside a noexcept destructor: SIGABRT
    "terminate called without an active exception" (pytorch#190489). So: after a completed run, one more collective
    on a tensor we hold, waiting (without the GIL) until gloo has released it (`_use_count()` back to 1); on every
    ending, a short GIL-free grace so a worker still freeing an earlier collective finishes too. No collective after
    an error: a peer may be gone or inside another collective.
    """
    if not tdist.is_initialized():
        return
    if handshake:
        held = torch.zeros(1, device=device)
        try:
            tdist.all_reduce(held)
        except (RuntimeError, tdist.DistBackendError):
            pass  # the run itself succeeded; a peer that already left cannot hand back anything here
        use_count = getattr(held, "_use_count", None)  # private API: without it, the grace below still applies
        deadline = time.monotonic() + GLOO_RELEASE_TIMEOUT_S
        while use_count is not None and use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    time.sleep(GLOO_GRACE_S)


def _subgroups_inherit_timeout(timeout: datetime.timedelta) -> None:
    """Make the process groups DeepSpeed creates (data parallel, ZeRO partition groups) use `timeout` too.

    DeepSpeed creates them with ``torch.distributed.new_group(ranks)``, which falls back to torch's default timeout
    (30 minutes for gloo, 10 for NCCL) instead of the default group's: gradient all-reduces would then wait that
    long for a dead or stuck rank. Its comm backend object is the one place all those calls go through.
    """
    from deepspeed.comm import comm as ds_comm

    backend = ds_comm.cdb
    if backend is None:
        return

    def new_group(ranks: list[int] | None) -> Any:
        return tdist.new_group(ranks, timeout=timeout)

    backend.new_group = new_group


class StepGate:
    """Lets the Trainer veto the parameter update of one ``engine.step()`` while DeepSpeed does everything else.

    DeepSpeed only skips a step by itself when the (fp16 loss-scaled, or in recent versions any) gradient norm is
    not finite. To also skip a step whose *loss* was non-finite on some rank, the client optimizer's ``step``
    is shadowed by an instance attribute: when ``skip`` is set, the inner optimizer update is a no-op, so the
    fp32 master weights and Adam moments stay bit-identical, while DeepSpeed still runs its own bookkeeping
    (gradient reduction, clipping, zeroing of partitioned gradient buffers, micro/global step counters),
    keeping its internal state consistent at ZeRO 0-3. The copy of master weights back into the module is a
    copy of unchanged values.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._inner_step = optimizer.step
        self.skip = False
        optimizer.step = self._guarded  # type: ignore[method-assign]

    def _guarded(self, *args: Any, **kwargs: Any) -> Any:
        if self.skip:
            return None
        return self._inner_step(*args, **kwargs)


@dataclass
class Part:
    """One trainable part: its DeepSpeed engine, the client optimizer (carries the LR) and its step gate."""

    name: str
    engine: Any  # deepspeed.DeepSpeedEngine (an nn.Module wrapping the part's module)
    optimizer: torch.optim.Optimizer
    gate: StepGate

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices/kernels only: biases, norm gains and scalars (ndim < 2) are not decayed."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch AdamW (nothing to compile); DeepSpeedCPUAdam when optimizer state is offloaded to CPU."""
    groups = param_groups(module, cfg.optim.weight_decay)
    if not groups:
        raise PipelineError("a trainable part has no parameters that require gradients")
    opt = cfg.optim
    if cfg.dist.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, adamw_mode=True)
    fused = opt.fused == "on" or (opt.fused == "auto" and torch.cuda.is_available())
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=fused or None)


def make_part(name: str, module: nn.Module, cfg: Config, ds_config: dict[str, Any]) -> Part:
    """Wrap `module` in a DeepSpeed engine with its own client optimizer and step gate."""
    import deepspeed

    optimizer = make_optimizer(module, cfg)
    gate = StepGate(optimizer)
    with scalar_parameters_supported():
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
    return Part(name, engine, optimizer, gate)
