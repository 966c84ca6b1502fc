"""Every shipped launcher, run for real on CPU (gloo, 2 ranks), trains the shared config to exactly the weights of
`launch/torchrun.sh` on one node (the `reference` fixture): the deepspeed launcher with a localhost hostfile,
accelerate with launch/accelerate/cpu_2proc.yaml, and launch/slurm.sbatch under a fake srun/scontrol, pre-empted
by SIGTERM, requeued and resumed."""
from __future__ import annotations

import json
import os
import signal

import pytest

from launch_helpers import (BIN, LAUNCH, fake_slurm_bin, finish, port_in, script_env, start, tail, wait_until)
from pipeline.train.launch_env import free_port
from train_helpers import assert_same_weights, latest_name, read_metrics, weights

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 300


def assert_two_ranks_trained(run, reference) -> None:
    meta = json.loads((run / "checkpoints" / "step_00000012" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 3
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    assert_same_weights(weights(run), reference.weights)


def test_deepspeed_launcher_with_a_localhost_hostfile(reference, tmp_path):
    """A hostfile naming only localhost: the launcher starts both slots here, without ssh/pdsh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run, log = tmp_path / "run", tmp_path / "ds.log"
    env = script_env(HOSTFILE=str(hostfile), MASTER_PORT=str(free_port()))
    proc = start([LAUNCH / "deepspeed.sh", reference.config, "--run-dir", run], env, log)
    assert finish(proc, JOB_TIMEOUT_S) == 0, tail(log)
    assert_two_ranks_trained(run, reference)


def test_accelerate_launch_with_the_cpu_config(reference, tmp_path):
    """`accelerate-launch` is `accelerate launch` (accelerate.commands.launch:main) without the CLI's other
    subcommands, whose imports (timm -> torchvision) fail on CPU torch with the registry's CUDA torchvision."""
    run, log = tmp_path / "run", tmp_path / "accelerate.log"
    cmd = [BIN / "accelerate-launch", "--config_file", LAUNCH / "accelerate" / "cpu_2proc.yaml",
           "-m", "pipeline", "train", reference.config, "--run-dir", run]
    proc = start(cmd, script_env(), log)
    assert finish(proc, JOB_TIMEOUT_S) == 0, tail(log)
    assert_two_ranks_trained(run, reference)


def test_slurm_script_preempted_requeues_and_the_requeued_job_resumes(reference, tmp_path):
    """Two tasks on this machine as srun starts them; SIGTERM to the batch script (what --signal=B:TERM@120 and
    pre-emption send): every rank checkpoints and exits 75, the script calls `scontrol requeue` and exits 0. srun
    may report 143 instead (--kill-on-bad-exit: the first exit 75 gets a rank still exiting a SIGTERM), which the
    script treats the same after a stop signal. The requeued job (the same script again) resumes and ends with the
    reference weights, without requeueing."""
    port = port_in(20000, 40000)  # the pipeline derives the port from the job id: 20000 + id % 20000
    requeues = tmp_path / "scontrol.log"
    env = script_env(PATH=f"{fake_slurm_bin(tmp_path / 'bin')}{os.pathsep}{os.environ.get('PATH', '')}",
                     SLURM_JOB_ID=str(port - 20000), SLURM_NTASKS="2", SLURM_NNODES="1",
                     SLURM_NTASKS_PER_NODE="2", SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
                     FAKE_SLURM_LOG=str(requeues))
    run = tmp_path / "run"
    cmd = ["bash", LAUNCH / "slurm.sbatch", reference.config, "--run-dir", run]
    first_log, second_log = tmp_path / "job1.log", tmp_path / "job2.log"
    job = start([*cmd, "--set", "model.step_sleep_s=0.3"], env, first_log)
    metrics = run / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, JOB_TIMEOUT_S, [job],
               "two steps")
    os.kill(job.pid, signal.SIGTERM)
    assert finish(job, JOB_TIMEOUT_S) == 0, tail(first_log)
    stopped = read_metrics(run)[-1]["step"]
    assert 2 <= stopped < 12 and latest_name(run) == f"step_{stopped:08d}", tail(first_log)
    assert any(f"(exit {code}); requeueing job" in first_log.read_text() for code in (75, 143)), tail(first_log)
    assert requeues.read_text() == f"requeue {port - 20000}\n"

    job = start(cmd, env, second_log)
    assert finish(job, JOB_TIMEOUT_S) == 0, tail(second_log)
    assert f"(step {stopped})" in second_log.read_text() and "resumed from" in second_log.read_text()
    assert requeues.read_text() == f"requeue {port - 20000}\n"  # finished: not requeued again
    assert_two_ranks_trained(run, reference)
