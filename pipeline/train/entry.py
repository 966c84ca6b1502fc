"""Entry point for ``python -m pipeline train CONFIG --run-dir DIR``: launch environment -> process group ->
start-up checks (every rank runs the same config and code and sees the same RUN_DIR) -> Trainer -> exit code.

Exit codes: 0 when train.max_steps is reached (or was already reached by the checkpoint resumed from);
``ckpt.preempt_exit_code`` (default 0) after a stop signal made the run checkpoint and stop; errors raise
:class:`~pipeline.errors.PipelineError` subclasses that the CLI turns into one line and exit code 1/2.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from pipeline.config import Config
from pipeline.config_schema import to_dict
from pipeline.errors import PipelineError
from pipeline.registry import stage_class
from pipeline.train.backend import Dist, process_group, release_gloo_tensors, select_device
from pipeline.train.launch_env import deepspeed_environment, detect_launch_env, free_port
from pipeline.train.setup import DataSources, default_data_sources
from pipeline.train.signals import StopRequest
from pipeline.train.trainer import Trainer


def _quiet_deepspeed(rank: int) -> None:
    """DeepSpeed logs every engine detail at INFO on every rank; keep its warnings (rank 0) and errors."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def _log_to_stderr(rank: int) -> None:
    """Rank 0 shows this package's INFO lines (resume, rollback, data skips); other ranks warnings only.

    One handler, on the root logger, and only if nobody configured logging: a handler of our own next to the
    root's (which libraries create implicitly through module-level ``logging.info`` calls) printed every line twice.
    """
    logging.getLogger("pipeline").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def code_fingerprint(cfg: Config) -> dict[str, str]:
    """sha256 of the source of every module this process loaded from this package and of the stage's module (a
    stage outside the package, e.g. a user's own, is code too), plus library versions.

    Loaded modules only: the code this run executes, and a file edited in the checkout that the run never imports
    (another stage being written) does not fail a run whose ranks read it a moment apart.
    """
    import deepspeed  # seconds to import: only where needed

    package = Path(__file__).resolve().parents[1]
    stage_module = stage_class(cfg.stage).__module__
    files = {}
    for name, module in list(sys.modules.items()):
        path = Path(getattr(module, "__file__", None) or "/").resolve()
        if path.suffix == ".py" and (package in path.parents or name == stage_module):
            files[str(path.relative_to(package.parent)) if package in path.parents else f"stage module {name}"] = path
    out = {name: hashlib.sha256(files[name].read_bytes()).hexdigest() for name in sorted(files)}
    out.update({"torch version": torch.__version__, "deepspeed version": deepspeed.__version__})
    return out


def _first_difference(values: list[dict[str, Any]]) -> tuple[str, int, int] | None:
    """(key, rank a, rank b) of the first key whose value differs between two ranks; None if all agree."""
    for key in sorted(set().union(*values)):
        seen = [v.get(key, "<missing>") for v in values]
        other = next((r for r, v in enumerate(seen) if v != seen[0]), None)
        if other is not None:
            return key, 0, other
    return None


def check_ranks_agree(dist: Dist, cfg: Config) -> None:
    """Every rank must run the same resolved config and the same code; fails on every rank naming what differs.

    Nodes start their own command: a different --set, an edited config or another checkout on one node would
    otherwise train silently wrong (or hang in mismatched collectives much later).
    """
    if dist.world_size == 1:
        return
    everyone = dist.gather_objects({"config": _flat(to_dict(cfg)), "code": code_fingerprint(cfg)})
    configs = _first_difference([e["config"] for e in everyone])
    if configs is not None:
        key, a, b = configs
        raise PipelineError(f"ranks were started with different configs: {key} is "
                            f"{everyone[a]['config'].get(key)!r} on rank {a} but {everyone[b]['config'].get(key)!r} "
                            f"on rank {b}; start every node with the same CONFIG and --set overrides")
    code = _first_difference([e["code"] for e in everyone])
    if code is not None:
        key, a, b = code
        values = f" ({everyone[a]['code'].get(key)} vs {everyone[b]['code'].get(key)})" if "version" in key else ""
        raise PipelineError(f"ranks run different code: {key} differs between rank {a} and rank {b}{values}; run "
                            "the same checkout and package versions on every node")


SHARED_WAIT_S = 5.0  # network filesystems may show a new file to other nodes a moment late


def check_run_dir_shared(dist: Dist, run_dir: Path) -> None:
    """Rank 0 writes a marker into RUN_DIR; every rank must see it (checkpoints are written by all ranks into one
    folder). Fails on every rank, before any model is built, naming the ranks that do not see it."""
    if dist.world_size == 1:
        return
    name = dist.gather_objects(f".shared-check-{uuid.uuid4().hex}")[0]
    marker = run_dir / name
    if dist.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(name, encoding="utf-8")
    dist.barrier("run dir check")
    deadline = time.monotonic() + SHARED_WAIT_S
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    blind = [rank for rank, seen in enumerate(dist.gather_objects(marker.is_file())) if not seen]
    if dist.rank == 0:
        marker.unlink(missing_ok=True)
    if blind:
        raise PipelineError(f"--run-dir {run_dir} is not shared by all ranks: rank(s) {blind} do not see a file "
                            "rank 0 wrote there; put RUN_DIR on a filesystem every node mounts at the same path")


@contextmanager
def local_process_group(timeout_s: int = 600) -> Iterator[None]:
    """One single-process group for an application that trains several runs in this process (the demo, tests):
    DeepSpeed caches process groups in module globals, so a group created after a first one was destroyed meets
    stale caches ("Group ... is not registered"). Runs inside it use it and leave it alone; it ends at exit."""
    if tdist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                             timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        if backend == "gloo":
            release_gloo_tensors(torch.device("cpu"), handshake=True)
        tdist.destroy_process_group()


def run_training(cfg: Config, run_dir: Path, *, sources: DataSources | None = None) -> int:
    """Train `cfg` in `run_dir`, resuming from its latest checkpoint (per ckpt.resume); returns the exit code.

    `sources` replaces the data-loader builders (tests); by default ``pipeline.data.loader`` is used.
    """
    env = detect_launch_env()
    _log_to_stderr(env.rank)
    run_dir = Path(run_dir)
    stop = StopRequest()
    with deepspeed_environment(env), stop.installed(), warnings.catch_warnings():
        # DeepSpeed calls torch.distributed functions that torch deprecates, once per collective.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
        _quiet_deepspeed(env.rank)
        device = select_device(env)
        with process_group(env, cfg, device) as dist:
            check_ranks_agree(dist, cfg)
            check_run_dir_shared(dist, run_dir)
            trainer = Trainer(cfg, run_dir, dist, stop, sources or default_data_sources())
            try:
                return trainer.run()
            finally:
                trainer.close()
