"""Elastic recovery: two torchrun "nodes" (launch/torchrun.sh, c10d rendezvous on 127.0.0.1, one worker each);
SIGKILL one worker mid-run: torchrun restarts the group on both nodes, the ranks resume from the latest complete
checkpoint by themselves, and the job ends exactly as an undisturbed run of the same config.

By hand (two shells, or two hosts with MASTER_ADDR=<first host> and a shared RUN_DIR)::

    NNODES=2 NPROC_PER_NODE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29400 RDZV_ID=demo MAX_RESTARTS=1 \\
        launch/torchrun.sh CONFIG --run-dir RUN --set model.step_sleep_s=0.3
    kill -9 <the python child of one torchrun>          # after RUN/checkpoints/latest names step_00000004
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from launch_helpers import LAUNCH, TIMEOUT_S, finish, kill, script_env, start, tail, wait_until, workers
from pipeline.train.launch_env import free_port
from train_helpers import assert_same_weights, latest_name, read_metrics, weights

pytestmark = pytest.mark.slow

RDZV_TIMEOUT_S = 2 * TIMEOUT_S  # a surviving node notices the dead peer within dist.timeout_s, then rejoins
JOB_TIMEOUT_S = 300


def restarted_workers(agents: list[subprocess.Popen], victim: int) -> list[list[int]] | None:
    """Ranks per agent of the restarted group (None if the job ended before both were seen); waits for the end."""
    seen = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while any(agent.poll() is None for agent in agents) and time.monotonic() < deadline:
        now = [workers(agent) for agent in agents]
        if all(now) and victim not in [pid for w in now for pid in w.values()]:
            seen = seen or [sorted(w) for w in now]
        time.sleep(0.05)
    return seen


def test_killed_worker_restarts_the_group_and_the_run_ends_as_undisturbed(reference, tmp_path):
    run = tmp_path / "run"
    env = script_env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                     RDZV_ID="elastic-test", MAX_RESTARTS="1", RDZV_TIMEOUT=str(RDZV_TIMEOUT_S))
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    # 0.3 s per micro-batch (2 per step; sleeping changes no number): steps 5-8 cannot finish before the kill
    cmd = [LAUNCH / "torchrun.sh", reference.config, "--run-dir", run, "--set", "model.step_sleep_s=0.3"]
    agents = [start(cmd, env, log) for log in logs]
    try:
        wait_until(lambda: latest_name(run) == "step_00000004", JOB_TIMEOUT_S, agents, "the step-4 checkpoint")
        before = [workers(agent) for agent in agents]
        victim = next(pids[0] for pids in before if 0 in pids)  # rank 0: hosts the group's store, writes metrics
        os.kill(victim, signal.SIGKILL)
        after = restarted_workers(agents, victim)
        codes = [finish(agent, JOB_TIMEOUT_S) for agent in agents]
    finally:
        kill(agents)
    output = "\n".join(tail(log, 6000) for log in logs)
    assert codes == [0, 0], output
    # torchrun orders nodes by (host name, agent pid): the same agents keep their ranks; resuming would be exact
    # with any order, as every rank's state is stored under its rank index in the shared RUN_DIR.
    print(f"ranks per node before the kill {[sorted(w) for w in before]}, after the restart {after}")
    assert after is None or sorted(sum(after, [])) == [0, 1]  # the world size stays 2
    resumed = [line for line in output.splitlines() if "resumed from" in line]
    assert resumed and ("(step 4)" in resumed[0] or "(step 8)" in resumed[0]), output
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))  # each step once, none lost or repeated
    assert_same_weights(weights(run), reference.weights)
