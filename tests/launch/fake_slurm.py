"""Stand-ins for SLURM's `srun` and `scontrol` on one machine, so launch/slurm.sbatch runs for real in tests.

    fake_slurm.py srun [--option ...] COMMAND ...   SLURM_NTASKS local tasks of COMMAND, each with the variables srun
                                                    sets (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_STEP_ID);
                                                    SIGTERM/SIGINT/SIGUSR1 are passed on to every task; with
                                                    --kill-on-bad-exit a task exiting non-zero gets the others
                                                    SIGTERM, then SIGKILL after KILL_WAIT_S; the exit code is the
                                                    largest task code (128 + N for a task ended by signal N), as srun's.
    fake_slurm.py scontrol ARGS ...                 appends "ARGS" as one line to $FAKE_SLURM_LOG, exits 0.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

KILL_WAIT_S = 10.0


def srun(argv: list[str]) -> int:
    kill_on_bad_exit = False
    while argv and argv[0].startswith("-"):
        option = argv.pop(0)
        kill_on_bad_exit |= option.startswith("--kill-on-bad-exit") and not option.endswith("=0")
    ntasks = int(os.environ["SLURM_NTASKS"])
    tasks = [subprocess.Popen(argv, env={**os.environ, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
                                         "SLURM_NODEID": "0", "SLURM_STEP_ID": "0"})
             for task in range(ntasks)]

    def forward(signum: int, frame: object) -> None:
        for task in tasks:
            if task.poll() is None:
                task.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    bad_since = None
    while any(task.poll() is None for task in tasks):
        if kill_on_bad_exit and bad_since is None and any(task.returncode for task in tasks):
            bad_since = time.monotonic()
            forward(signal.SIGTERM, None)
        if bad_since is not None and time.monotonic() - bad_since > KILL_WAIT_S:
            for task in tasks:
                task.kill()
        time.sleep(0.05)
    return max(code if code >= 0 else 128 - code for code in (task.returncode for task in tasks))


def scontrol(argv: list[str]) -> int:
    with open(os.environ["FAKE_SLURM_LOG"], "a", encoding="utf-8") as log:
        log.write(" ".join(argv) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit({"srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:]))
