"""The one module that reads launcher environment variables; everything else receives a :class:`LaunchEnv`.

Supported launchers and what they set:

- torchrun, the ``deepspeed`` launcher (pdsh) and ``accelerate launch``: RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT (LOCAL_WORLD_SIZE where available).
- ``srun`` (one task per GPU, no torchrun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST,
  SLURM_NTASKS_PER_NODE; the master is the first host of SLURM_NODELIST, the port MASTER_PORT or one derived
  from SLURM_JOB_ID so that concurrent jobs on a node do not collide.
- ``mpirun`` (deepspeed ``--launcher openmpi``): OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE plus
  MASTER_ADDR/MASTER_PORT from the launcher.
- nothing: a single process, rank 0 of 1, on a free local port.

DeepSpeed itself reads RANK/LOCAL_RANK/WORLD_SIZE from ``os.environ``; :func:`deepspeed_environment` writes the
resolved values there for the duration of a run (the only write), so every launcher looks like torchrun to it.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.errors import UsageError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job. `launcher` names the source of the values (for messages)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def world_size_source(self) -> str:
        """Where the world size came from, e.g. 'WORLD_SIZE=3' (for messages)."""
        key = {"torchrun": "WORLD_SIZE", "slurm": "SLURM_NTASKS", "openmpi": "OMPI_COMM_WORLD_SIZE"}.get(self.launcher)
        return f"{key}={self.world_size}" if key else "a single process"

    @property
    def init_method(self) -> str:
        """The torch.distributed rendezvous URL (explicit, so no environment is consulted again)."""
        return f"tcp://{self.master_addr}:{self.master_port}"


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise UsageError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (single-process runs need one for the store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'; 'a1,a2' -> 'a1'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UsageError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _from_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    local_world = _int(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
    if world > 1 and not ("MASTER_ADDR" in environ and "MASTER_PORT" in environ):
        raise UsageError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; launch with torchrun, "
                         "the deepspeed launcher or srun")
    addr = environ.get("MASTER_ADDR", "127.0.0.1")
    port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else free_port()
    return LaunchEnv(rank, local_rank, world, local_world, addr, port, "torchrun")


def _from_openmpi(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "OMPI_COMM_WORLD_SIZE")
    rank = _int(environ, "OMPI_COMM_WORLD_RANK")
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in environ else 0
    local_world = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in environ else 1
    if "MASTER_ADDR" not in environ and world > 1:
        raise UsageError("mpirun launch without MASTER_ADDR; the deepspeed launcher sets it, or export it")
    port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_PORT
    return LaunchEnv(rank, local_rank, world, local_world, environ.get("MASTER_ADDR", "127.0.0.1"), port, "openmpi")


def _from_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "SLURM_NTASKS")
    rank = _int(environ, "SLURM_PROCID")
    local_rank = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    local_world = int(per_node) if per_node.isdigit() else 1
    addr = environ.get("MASTER_ADDR") or first_slurm_host(environ.get("SLURM_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    else:  # derived from the job id: all tasks agree without talking, concurrent jobs differ
        port = 20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000
    return LaunchEnv(rank, local_rank, world, local_world, addr, port, "slurm")


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Resolve rank, world size and rendezvous from the launcher's environment (torchrun > mpi > slurm > none).

    A single `srun` task inside a SLURM allocation (SLURM_NTASKS=1) and a plain `python` call both give a
    single-process run.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = _from_torchrun(environ)
    elif "OMPI_COMM_WORLD_SIZE" in environ and "OMPI_COMM_WORLD_RANK" in environ:
        env = _from_openmpi(environ)
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ and environ.get("SLURM_NTASKS") != "1":
        env = _from_slurm(environ)
    else:
        env = LaunchEnv(0, 0, 1, 1, "127.0.0.1", free_port(), "single")
    if not (0 <= env.rank < env.world_size) or env.local_rank < 0:
        raise UsageError(f"inconsistent launch environment from {env.launcher}: rank {env.rank}, "
                         f"local rank {env.local_rank}, world size {env.world_size}")
    return env


EXPORTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def deepspeed_environment(env: LaunchEnv, environ: MutableMapping[str, str] | None = None) -> Iterator[None]:
    """Write the resolved values where DeepSpeed looks for them (it asserts LOCAL_RANK is set) for the
    duration of a run, then restore what was there (in-process runs, e.g. tests, stay independent)."""
    environ = os.environ if environ is None else environ
    saved = {key: environ.get(key) for key in EXPORTED}
    values = (env.rank, env.local_rank, env.world_size, env.local_world_size, env.master_addr, env.master_port)
    environ.update({key: str(value) for key, value in zip(EXPORTED, values)})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
