"""Helpers of the launcher tests: the shared run config, the launch scripts run for real, processes and their logs.

Every process is started in its own session with its output in a file (a full pipe would block it), and every
wait has a deadline after which the whole process group is killed: nothing here can hang a test run.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from train_helpers import REPO, base_config, subprocess_env, write_config

LAUNCH = REPO / "launch"
BIN = Path(sys.executable).parent
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm.py"
TIMEOUT_S = 30  # dist.timeout_s of the shared config: a dead or stuck peer fails a collective after this


def launch_config(shards: Path, path: Path) -> Path:
    """The config every launcher trains (toy stage, ZeRO-3, 12 steps, a checkpoint every 4)."""
    raw = base_config(shards, train={"max_steps": 12}, dist={"zero_stage": 3, "timeout_s": TIMEOUT_S},
                      ckpt={"every_steps": 4, "keep_last": 0})
    return write_config(path, raw)


def script_env(**extra: str) -> dict[str, str]:
    """The test environment for launch scripts: they run this venv's python (PYTHON).

    PATH stays as it is: with the venv's bin first, torch's JIT build of DeepSpeed's shm op would find the venv's
    ninja instead of the system's, whose different command hashes make each rebuild the op the other just built.
    """
    return subprocess_env(PYTHON=sys.executable, **extra)


def start(cmd: Sequence[str | Path], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill(procs: Sequence[subprocess.Popen]) -> None:
    """SIGKILL the process group of every process still running (launchers, their workers, data workers)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code; after `timeout` s the process group is killed and the test fails."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill([proc])
        raise AssertionError(f"{proc.args[:3]} still running after {timeout} s") from None


def wait_until(predicate: Callable[[], bool], timeout: float, procs: Sequence[subprocess.Popen], what: str) -> None:
    """Poll `predicate`; fail if a process in `procs` exits first or after `timeout` s (killing `procs`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            kill(procs)
            raise AssertionError(f"{ended[0].args[:3]} exited ({ended[0].returncode}) before {what}")
        time.sleep(0.05)
    kill(procs)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "<no log>"


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def rank_of(pid: int) -> int | None:
    """RANK in a process's environment (a torchrun worker), None for other processes or ones already gone."""
    try:
        environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)


def workers(agent: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the training processes a torchrun agent runs now."""
    return {rank: pid for pid in children(agent.pid) if (rank := rank_of(pid)) is not None}


def port_in(low: int, high: int) -> int:
    """A free TCP port in [low, high) (SLURM runs derive theirs from the job id: 20000 + id % 20000)."""
    for port in range(low + os.getpid() % 997, high):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in [{low}, {high})")


def fake_slurm_bin(directory: Path) -> Path:
    """A folder with `srun` and `scontrol` that run fake_slurm.py; put it first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("srun", "scontrol"):
        script = directory / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SLURM}" {name} "$@"\n')
        script.chmod(0o755)
    return directory
