"""The benchmark scripts (benchmarks/train_throughput.py, zero_memory.py, gpu_check.sh) in their small CPU modes:
they run end to end, print the expected table, and their numbers are sane. The FLOP counting path is checked
against a hand count on a two-layer linear stage (defined here; subprocesses import it as
``test_benchmark_scripts:LinearStage``)."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from pipeline.config_schema import doc
from pipeline.data.spec import SampleSpec
from pipeline.train.stage import Stage, StepOutput

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BENCH = REPO / "benchmarks"
TORCHRUN = Path(sys.executable).with_name("torchrun")
STAGE = "test_benchmark_scripts:LinearStage"


@dataclass(frozen=True)
class LinearConfig:
    width_in: int = doc(24, "Input features.")
    hidden: int = doc(16, "Hidden features.")
    width_out: int = doc(8, "Outputs.")


class Features:
    """Captions -> fixed random features "x" float32 (B, width) (picklable, like a tokenizer)."""

    def __init__(self, width: int) -> None:
        self.width = width

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(len(captions), self.width, generator=torch.Generator().manual_seed(0))}


class LinearStage(Stage):
    """Linear(in, hidden) -> ReLU -> Linear(hidden, out), loss = mean square of the output."""

    name = "linear"
    model_config_cls = LinearConfig

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(image_size=0, tokenize=Features(self.cfg.model.width_in))

    def build_trainable(self) -> dict[str, nn.Module]:
        m = self.cfg.model
        return {"model": nn.Sequential(nn.Linear(m.width_in, m.hidden), nn.ReLU(), nn.Linear(m.hidden, m.width_out))}

    def training_step(self, models, frozen, batch, part) -> StepOutput:
        y = models[part](batch["x"].to(self.ctx.device, self.ctx.compute_dtype))
        return StepOutput(y.float().pow(2).mean(), {})


def hand_flops_per_sample(width_in: int, hidden: int, width_out: int) -> int:
    """2 FLOPs per multiply-add. Forward: both layers. Backward: both weight gradients, and the input gradient of
    the second layer only (the first layer's input needs none)."""
    first, second = width_in * hidden, hidden * width_out
    return 2 * (first + second) + 2 * (first + second) + 2 * second


def load_script(name: str):
    """benchmarks/NAME.py as a module (registered, so its dataclasses resolve their annotations)."""
    if f"bench_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[f"bench_{name}"]


def linear_config(path: Path, **model: int) -> Path:
    raw = {"stage": STAGE, "model": model, "data": {"urls": "unused"},
           "train": {"micro_batch_size": 4, "max_steps": 10}, "optim": {"lr": 0.01, "warmup_steps": 0}}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_script(args: list[str], timeout: float) -> str:
    done = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def figures(text: str) -> dict[str, str]:
    """The `| figure | value |` rows of a train_throughput table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] not in ("figure", "---"):
            rows[cells[0]] = cells[1]
    return rows


THROUGHPUT_ROWS = ("device", "versions", "date", "config", "precision", "batch", "ZeRO stage", "world size",
                   "samples/s (global)", "samples/s per rank", "data wait (ms)", "forward (ms): stage.training_step",
                   "backward (ms): engine.backward", "optimizer (ms): engine.step", "communication",
                   "model FLOPs per sample (fwd+bwd)", "matmul peak measured (TFLOP/s)", "MFU vs measured matmul",
                   "spec-sheet peak (TFLOP/s)", "peak memory (GiB)")


def number(cell: str) -> float:
    return float(re.match(r"[-+0-9.e]+", cell.replace(",", "")).group(0))


# ------------------------------------------------------------------------------------------- FLOP counting
def test_flop_counting_matches_the_hand_count_of_a_linear_stage():
    from pipeline.config import load_config
    from pipeline.train.ds_config import Precision

    tt = load_script("train_throughput")
    cfg = load_config(None, base={"stage": STAGE, "model": {"width_in": 40, "hidden": 24, "width_out": 12}})
    dist = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    stage = LinearStage(cfg, SimpleNamespace(rank=0, world_size=1, device=dist.device, compute_dtype=torch.float32))
    batch = tt.synthetic_batch(stage, stage.sample_spec(), 6)
    per_sample = tt.model_flops_per_sample(cfg, dist, Precision("fp32", torch.float32), {}, batch, samples=3)
    expected = hand_flops_per_sample(40, 24, 12)
    assert abs(per_sample - expected) <= 0.01 * expected, (per_sample, expected)


def test_zero_formula():
    zm = load_script("zero_memory")
    psi = 1000
    fp32_z0, k0 = zm.predicted(psi, 0, 2, "fp32")
    assert (sum(fp32_z0.values()), k0) == (16 * psi, 8)  # 4 + 4 + 8, nothing partitioned
    fp32_z3, k3 = zm.predicted(psi, 3, 2, "fp32")
    assert (sum(fp32_z3.values()), k3) == (20 * psi / 2, 12)  # everything / N, with DeepSpeed's fp32 master
    bf16_z1, _ = zm.predicted(psi, 1, 4, "bf16")
    assert bf16_z1 == {"params": 2 * psi, "grads": 2 * psi, "optimizer": 2 * psi, "master": psi}


# -------------------------------------------------------------------------------------------- end to end
def test_train_throughput_runs_the_trainer_step_and_reports_flops_of_the_linear_stage(tmp_path):
    config = linear_config(tmp_path / "linear.yaml", width_in=24, hidden=16, width_out=8)
    out = tmp_path / "table.md"
    stdout = run_script([sys.executable, str(BENCH / "train_throughput.py"), "--config", str(config),
                         "--steps", "2", "--warmup", "1", "--out", str(out)], timeout=240)
    rows = figures(stdout)
    assert set(THROUGHPUT_ROWS) <= set(rows), sorted(set(THROUGHPUT_ROWS) - set(rows))
    assert figures(out.read_text(encoding="utf-8")) == rows
    assert number(rows["samples/s (global)"]) > 0 and number(rows["samples/s per rank"]) > 0
    flops = number(rows["model FLOPs per sample (fwd+bwd)"])
    expected = hand_flops_per_sample(24, 16, 8)
    assert abs(flops - expected) <= 0.01 * expected, (flops, expected)
    assert number(rows["matmul peak measured (TFLOP/s)"]) > 0 and number(rows["peak memory (GiB)"]) > 0
    assert rows["world size"] == "1" and rows["communication"].startswith("n/a")
    assert rows["precision"] == "fp32" and rows["spec-sheet peak (TFLOP/s)"].startswith("n/a")
    for phase in ("data wait (ms)", "forward (ms): stage.training_step", "backward (ms): engine.backward",
                  "optimizer (ms): engine.step"):
        assert number(rows[phase]) >= 0


@pytest.mark.slow
def test_train_throughput_unet_small_mode_on_two_ranks_reports_global_rate_and_communication(tmp_path):
    stdout = run_script([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(BENCH / "train_throughput.py"),
                         "--set", "train.micro_batch_size=2", "dist.zero_stage=2", "--steps", "1", "--warmup", "1"],
                        timeout=400)
    rows = figures(stdout)
    assert set(THROUGHPUT_ROWS) <= set(rows)
    assert rows["world size"] == "2" and rows["ZeRO stage"] == "2" and "x world 2 = 4 samples/step" in rows["batch"]
    assert number(rows["samples/s (global)"]) == pytest.approx(2 * number(rows["samples/s per rank"]), rel=0.01)
    assert number(rows["model FLOPs per sample (fwd+bwd)"]) > 1e6  # a U-Net, not nothing
    assert "ms/step in" in rows["communication"] and number(rows["communication"]) > 0
    assert stdout.count("### Training throughput") == 1  # rank 0 prints, the other rank does not


@pytest.mark.slow
def test_zero_memory_two_ranks_scales_as_the_formula_says(tmp_path):
    out = tmp_path / "zero.md"
    stdout = run_script([sys.executable, str(BENCH / "zero_memory.py"), "--worlds", "2", "--out", str(out)],
                        timeout=400)
    assert out.read_text(encoding="utf-8") in stdout
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| 2 |"):
            rows[int(cells[1])] = cells
    assert sorted(rows) == [0, 1, 2, 3]
    ratio = {zero: float(cells[9]) for zero, cells in rows.items()}
    assert 0.8 <= ratio[3] <= 1.3, ratio
    assert 0.95 <= ratio[0] <= 1.05, ratio
    params = {zero: float(cells[2].split("/")[0]) for zero, cells in rows.items()}
    assert params[3] == pytest.approx(params[0] / 2, rel=0.05)  # ZeRO-3 partitions the parameters over 2 ranks
    optimizer = {zero: float(cells[4].split("/")[0]) for zero, cells in rows.items()}
    assert optimizer[1] == pytest.approx(optimizer[0] / 2, rel=0.05)  # ZeRO-1 partitions the Adam moments
    assert float(rows[3][10]) > 0  # ZeRO-3 holds its reduce bucket: reported as buffers


# ------------------------------------------------------------------------------------------ bucket_compile
@pytest.mark.slow  # about 80 s of graph capture (aot_eager) on a 2-core CPU
def test_bucket_compile_counts_one_compile_dynamic_and_one_per_shape_static(tmp_path):
    """The Trainer's compiled step over 3 bucket shapes x 2 rounds: 'dynamic' compiles at the first step only,
    'static' once per shape; neither recompiles in the second round (the attention mask cache once keyed a guard on
    a tensor's id() and recompiled every step: caught here)."""
    out = tmp_path / "bucket_compile.md"
    run_script([sys.executable, str(BENCH / "bucket_compile.py"), "--backend", "aot_eager", "--policies", "dynamic",
                "static", "--shapes", "3", "--rounds", "2", "--set", "train.micro_batch_size=4", "--out", str(out)],
               timeout=600)
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                          for line in out.read_text(encoding="utf-8").splitlines()
                                          if line.startswith("| dynamic") or line.startswith("| static"))}
    assert rows["dynamic"][1:5] == ["3", "6", "1 (0)", "1"]
    assert rows["static"][1:4] == ["3", "6", "3 (0)"]


# ---------------------------------------------------------------------------------------------- gpu_check
def test_gpu_check_plan_and_wheel_folder():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    plan = done.stdout
    for needle in ("pytest tests/kernels -m gpu", "benchmarks/attention.py", "benchmarks/groupnorm_silu.py",
                   "benchmarks/bucket_compile.py",
                   "configs/unet/base64.yaml", "configs/unet/latent256_sd2.yaml",
                   "--random-autoencoder configs/autoencoder/kl_f8.yaml", "--no-index --no-deps"):
        assert needle in plan, needle
    only = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "GPU_CHECK_ONLY": "attention,train_base64"})
    assert only.returncode == 0, only.stderr
    assert "benchmarks/attention.py" in only.stdout and "base64.yaml" in only.stdout
    assert "groupnorm_silu.py" not in only.stdout and "kernels" not in only.stdout
    wrong = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], cwd=REPO, capture_output=True,
                           text=True, timeout=60, env={**os.environ, "GPU_CHECK_ONLY": "atention"})
    assert wrong.returncode == 2 and "names no step" in wrong.stderr
    if (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/deepspeed-0.19.8-py3-none-any.whl"], cwd=REPO)
        assert ignored.returncode == 0, ".whl/ must be ignored by git (carried wheels are never committed)"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_without_a_gpu_records_that_and_exits_0(tmp_path):
    env = {**subprocess_env(), "OUT": str(tmp_path), "PYTHON": sys.executable, "WHEEL_DIR": str(tmp_path / "none")}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "no CUDA device" in summary and "| step | status | seconds | output |" in summary
    assert "torch 2" in (tmp_path / "environment.txt").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------- peers
@pytest.mark.slow
def test_peers_compares_every_cpu_section_and_states_each_goal(tmp_path):
    """benchmarks/peers.py in a tiny setting: every CPU section prints a row with both figures, the ratio and the
    goal; the two samplers of the sampling row run the same exported components (their ratio is near 1, not a
    multiple). Speeds themselves are not asserted (machine load would make that flaky)."""
    out = run_script([sys.executable, str(BENCH / "peers.py"), "--steps", "1", "--rounds", "1", "--data-samples",
                      "48", "--data-batches", "1", "--sample-images", "2", "--sample-steps", "2", "--set",
                      "train.micro_batch_size=4", "--out", str(tmp_path / "peers.md")], timeout=600)
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| section")]
    sections = [row[0] for row in rows]
    assert sections == ["train", "train", "data", "data", "sampling"], out
    for section, case, ours, theirs, unit, ratio, goal in rows:
        assert number(ours) > 0 and number(theirs) > 0 and ("met" in goal or "MISSED" in goal), (section, case)
        assert number(ratio.rstrip("x")) == pytest.approx(number(ours) / number(theirs) if unit != "images per CPU-s"
                                                          else number(theirs) / number(ours), rel=0.01)
    assert 0.5 < number(rows[-1][5].rstrip("x")) < 2.0
    assert "AMD" in out or "Intel" in out or "CPU" in out or "cores" in out  # the machine is named
    assert (tmp_path / "peers.md").read_text() in out  # stdout also holds DeepSpeed's log lines


def test_objective_backbone_trains_exports_and_scores_each_run(tmp_path):
    """benchmarks/objective_backbone.py in a tiny setting: a row per run with a fidelity pair per sampling-step
    count (the flow runs sample through their exported FlowMatch scheduler config)."""
    out = run_script([sys.executable, str(BENCH / "objective_backbone.py"), str(tmp_path), "--steps", "2",
                      "--prompts", "2", "--train-samples", "64", "--runs", "dit_flow"], timeout=600)
    rows = [line for line in out.splitlines() if line.startswith("| dit_flow |")]
    assert len(rows) == 1 and rows[0].count(" / ") == 4, out[-2000:]


@pytest.mark.slow
def test_bucket_fidelity_trains_both_runs_and_scores_each_shape(tmp_path):
    """benchmarks/bucket_fidelity.py in a tiny setting: three shapes per run (the centre-crop model sampled at shapes
    it never trained on), and the cut-object shares of a centre crop (a 2:1 scene's left/right objects sit at its
    border: some are cut, never all)."""
    out = run_script([sys.executable, str(BENCH / "bucket_fidelity.py"), str(tmp_path), "--steps", "2",
                      "--prompts", "4", "--seeds", "0", "--train-samples", "120"], timeout=600)
    rows = [line for line in out.splitlines() if line.startswith(("| buckets |", "| centre |"))]
    assert len(rows) == 6 and all(row.count(" +- ") == 4 for row in rows), out[-2000:]
    assert {row.split("|")[3].strip() for row in rows} == {"16x16 (1:1)", "12x24 (2:1 wide)", "24x12 (1:2 tall)"}
    shares = [float(x) for x in re.findall(r"([0-9.]+)% of named objects partly cut", out)]
    assert len(shares) == 2 and all(5 < s < 95 for s in shares), out[:2000]
