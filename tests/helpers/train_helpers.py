"""Helpers of the Trainer tests: tiny configs, in-process and subprocess (torchrun) runs, reading results."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

HELPERS = Path(__file__).resolve().parent  # tests/helpers: also on the PYTHONPATH of subprocesses
REPO = HELPERS.parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STAGE = "trainer_toy_stage:ToyStage"


def base_config(shards: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny run: 16 px toy regressor, 6 steps, checkpoints every 3, every step logged; sections override."""
    raw: dict[str, Any] = {
        "stage": STAGE,
        "model": {"width": 8},
        "data": {"urls": str(shards / "train"), "eval_urls": str(shards / "heldout"), "resolution": 16,
                 "num_workers": 0, "shuffle_buffer": 16, "crop": "center"},
        "optim": {"lr": 0.01, "warmup_steps": 2, "schedule": "cosine", "grad_clip": 1.0},
        "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2, "log_every": 1, "seed": 0},
        "eval": {"every_steps": 0, "max_samples": 16, "batch_size": 8},
        "dist": {"zero_stage": 0, "timeout_s": 60},
        "ckpt": {"every_steps": 3, "keep_last": 0},
        "log": {"tensorboard": False, "progress_bar": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return raw


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def ensure_process_group() -> None:
    """One world-1 gloo process group for every in-process run of the session.

    DeepSpeed caches process groups in module globals; a second group created after the first was destroyed
    would meet stale caches. run_training uses an existing group and leaves it alone (it only destroys the
    groups it created), exactly as when an application embeds the Trainer.
    """
    import datetime

    import torch.distributed as tdist

    from pipeline.train.launch_env import free_port

    if not tdist.is_initialized():
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                 timeout=datetime.timedelta(seconds=120))


def train_inprocess(raw: dict[str, Any], run_dir: Path) -> int:
    """Run the Trainer in this process (world size 1)."""
    from pipeline.config import load_config
    from pipeline.train.entry import run_training

    ensure_process_group()
    cfg_path = write_config(run_dir.parent / f"{run_dir.name}.yaml", copy.deepcopy(raw))
    return run_training(load_config(cfg_path), run_dir)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(HELPERS), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def train_command(config: Path, run_dir: Path, nproc: int, *overrides: str) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    tail = ["-m", "pipeline", "train", str(config), "--run-dir", str(run_dir), *sets]
    if nproc == 1:
        return [sys.executable, *tail]
    return [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *tail]


def train_subprocess(config: Path, run_dir: Path, nproc: int = 1, *overrides: str,
                     timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `python -m pipeline train` (or torchrun with `nproc` ranks); a timeout fails the test, never hangs."""
    return subprocess.run(train_command(config, run_dir, nproc, *overrides), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_subprocess(config: Path, run_dir: Path, nproc: int = 1, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(train_command(config, run_dir, nproc, *overrides), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    """Poll `predicate` until true; fail (killing `proc`) after `timeout` s or if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    if proc is not None:
        os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`'s process group and every process below it: torchrun starts its ranks in their own sessions,
    so killing the launcher's group alone would leave the ranks training on."""
    below = _descendants(pid)
    os.killpg(pid, signal.SIGKILL)
    for child in below:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_and_resume(config: Path, tmp_path: Path, max_steps: int, *overrides: str,
                    timeout: float = 600, nproc: int = 1) -> tuple[Path, Path]:
    """An uninterrupted reference run, and a run SIGKILLed (with its data workers) after its step-8 checkpoint and
    re-run to the end; asserts the kill landed before the end, the re-run resumed at step 8 and logged every step
    once. Returns (ref, run) run dirs. `overrides` apply to the killed attempt only (e.g. a step sleep); `nproc`
    ranks run under torchrun."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = train_subprocess(config, ref, nproc, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = start_subprocess(config, run, nproc, *overrides)
    wait_for(lambda: latest_name(run) == "step_00000008", 300, proc, "the step-8 checkpoint")
    kill_tree(proc.pid)  # the trainer(s) and their data workers, mid-step 9 or later
    proc.wait(timeout=30)
    assert not (run / "checkpoints" / f"step_{max_steps:08d}").exists()
    resumed = train_subprocess(config, run, nproc, timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "(step 8)" in resumed.stderr, resumed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, max_steps + 1))  # one record per step
    return ref, run


def latest_name(run_dir: Path) -> str | None:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float | None]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def weights(run_dir: Path, checkpoint: str = "latest", use_ema: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Consolidated full weights of every part of a checkpoint (the export path, without writing a bundle)."""
    from pipeline.train.weights import consolidated_weights, resolve_checkpoint
    from pipeline.train.checkpoint import read_trainer_json

    ckpt = resolve_checkpoint(run_dir, checkpoint)
    return {part: consolidated_weights(ckpt, part, use_ema) for part in read_trainer_json(ckpt)["parts"]}


def assert_same_weights(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
