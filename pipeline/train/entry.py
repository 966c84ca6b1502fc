"""Entry point for ``python -m pipeline train CONFIG --run-dir DIR``: launch environment -> process group ->
Trainer -> exit code.

Exit codes: 0 when train.max_steps is reached (or was already reached by the checkpoint resumed from);
``ckpt.preempt_exit_code`` (default 0) after a stop signal made the run checkpoint and stop; errors raise
:class:`~pipeline.errors.PipelineError` subclasses that the CLI turns into one line and exit code 1/2.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from pipeline.config import Config
from pipeline.train.backend import process_group, select_device
from pipeline.train.launch_env import deepspeed_environment, detect_launch_env
from pipeline.train.setup import DataSources, default_data_sources
from pipeline.train.signals import StopRequest


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


def run_training(cfg: Config, run_dir: Path, *, sources: DataSources | None = None) -> int:
    """Train `cfg` in `run_dir`, resuming from its latest checkpoint (per ckpt.resume); returns the exit code.

    `sources` replaces the data-loader builders (tests); by default ``pipeline.data.loader`` is used.
    """
    from pipeline.train.trainer import Trainer

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
            trainer = Trainer(cfg, run_dir, dist, stop, sources or default_data_sources())
            try:
                return trainer.run()
            finally:
                trainer.close()
