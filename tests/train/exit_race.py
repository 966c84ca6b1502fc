"""Two-rank gloo runs that end while gloo may still hold a collective's tensor: the interpreter-exit race.

``python exit_race.py TRIALS [--error] [--no-release]`` forks TRIALS pairs of ranks. Each rank enters the project's own
``process_group``, runs a few of the Trainer's collectives, leaves it and exits through normal interpreter
finalization with ``sys.setswitchinterval(5)``, which widens the race window (a gloo worker that needs the GIL
after finalization began aborts the process with SIGABRT). Prints one line: ``aborted=A exited=E trials=T`` and
exits 1 if any rank did not exit with its expected status: 0, or 3 with ``--error``, where every rank raises inside
the process group after the collectives (a run ending with an error). ``--no-release`` disables the fix, to show that
the test detects the race.

Forking after the imports keeps a trial at a fraction of a second instead of a fresh interpreter per rank.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import pipeline  # noqa: F401  (the project's CPU-torch import fixes, as every entry point)
from pipeline.config import load_config
from pipeline.train import backend
from pipeline.train.launch_env import LaunchEnv, free_port

CONFIG = {"stage": "trainer_toy_stage:ToyStage", "dist": {"timeout_s": 30}}
HELD: list[object] = []  # outlives the run, as DeepSpeed's engines and groups._WORLD_GROUP do in a real one


class RunFailed(Exception):
    """Stands for any error that ends a run after its last collective."""


def rank_main(rank: int, port: int, error: bool) -> None:
    """One rank: the collectives a Trainer run ends with, then a normal interpreter exit."""
    sys.setswitchinterval(5.0)
    cfg = load_config(None, base=CONFIG)
    env = LaunchEnv(rank, rank, 2, 2, "127.0.0.1", port, "test")
    with backend.process_group(env, cfg, torch.device("cpu")) as dist:
        HELD.append(torch.distributed.group.WORLD)  # so leaving the group does not destroy it (and its workers)
        dist.gather_objects({"rank": rank})
        dist.all_reduce([1.0], op="max")
        dist.barrier("checkpoint published")
        if error:
            raise RunFailed


def main() -> int:
    trials, error = int(sys.argv[1]), "--error" in sys.argv
    expected = 3 if error else 0
    if "--no-release" in sys.argv:
        backend.release_gloo_tensors = lambda device, handshake: None
    aborted = failed = 0
    for _ in range(trials):
        port = free_port()
        pids = []
        for rank in (0, 1):
            pid = os.fork()
            if pid == 0:
                try:
                    rank_main(rank, port, error)
                except RunFailed:
                    sys.exit(3)
                sys.exit(0)  # SystemExit unwinds to the top: a normal Py_FinalizeEx, where the race happens
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            aborted += os.WIFSIGNALED(status)
            failed += not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == expected)
    print(f"aborted={aborted} failed={failed} trials={trials}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))  # the toy stage
    sys.exit(main())
