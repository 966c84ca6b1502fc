"""Fast unit tests of the Trainer's building blocks (no DeepSpeed engine, no process group)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipeline.config import Config, DistConfig, OptimConfig, TrainConfig, load_config
from pipeline.errors import CheckpointError, ConfigError, UsageError
from pipeline.registry import stage_class
from pipeline import manifest
from pipeline.train import rng
from pipeline.train.checkpoint import prune, write_latest, find_latest
from pipeline.train.ds_config import (Precision, build_deepspeed_config, deep_merge, resolve_precision,
                                       trainer_clips_gradients)
from pipeline.train.ema import consolidate
from pipeline.train.launch_env import deepspeed_environment, detect_launch_env, first_slurm_host
from pipeline.train.metrics import save_grid, truncate_metrics
from pipeline.train.schedule import lr_at

CPU = torch.device("cpu")


def test_launch_env_from_each_launcher():
    torchrun = detect_launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                                  "MASTER_ADDR": "node1", "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size, torchrun.init_method) == \
        (3, 1, 4, "tcp://node1:1234")
    slurm = detect_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                               "SLURM_NODELIST": "gpu[003-004,9]", "SLURM_JOB_ID": "77",
                               "SLURM_NTASKS_PER_NODE": "4(x2)"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr, slurm.local_world_size) == \
        (5, 8, 1, "gpu003", 4)
    assert slurm.master_port == 20077
    mpi = detect_launch_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                             "OMPI_COMM_WORLD_LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "99"})
    assert (mpi.rank, mpi.world_size, mpi.local_rank, mpi.launcher) == (1, 2, 1, "openmpi")
    single = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (single.rank, single.world_size, single.launcher) == (0, 1, "single")


def test_launch_env_rejects_inconsistent_values():
    with pytest.raises(UsageError, match="inconsistent"):
        detect_launch_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        detect_launch_env({"RANK": "0", "WORLD_SIZE": "2"})
    assert first_slurm_host("a1,a2") == "a1"


def test_deepspeed_environment_is_restored():
    env = detect_launch_env({})
    environ = {"RANK": "old"}
    with deepspeed_environment(env, environ):
        assert environ["LOCAL_RANK"] == "0" and environ["WORLD_SIZE"] == "1"
    assert environ == {"RANK": "old"}


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cos, 10) for s in (1, 2)] == [0.5, 1.0]
    assert lr_at(10, cos, 10) == pytest.approx(0.1) and lr_at(6, cos, 10) == pytest.approx(0.55)
    lin = OptimConfig(lr=1.0, schedule="linear")
    assert lr_at(5, lin, 10) == pytest.approx(0.5)
    const = OptimConfig(lr=2.0, warmup_steps=4, schedule="constant")
    assert lr_at(1, const, 10) == 0.5 and lr_at(9, const, 10) == 2.0


def test_precision_auto_is_fp32_on_cpu():
    assert resolve_precision(TrainConfig(), CPU) == Precision("fp32", torch.float32)
    assert resolve_precision(TrainConfig(precision="bf16"), CPU).dtype == torch.bfloat16


def test_deepspeed_config_generated_and_merged(tmp_path):
    cfg = Config(stage="x", train=TrainConfig(micro_batch_size=3, grad_accum_steps=4),
                 optim=OptimConfig(grad_clip=0.5), dist=DistConfig(zero_stage=2, offload_optimizer=True))
    ds = build_deepspeed_config(cfg, Precision("bf16", torch.bfloat16), CPU)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": True}}))
    merged = build_deepspeed_config(Config(stage="x", dist=DistConfig(zero_stage=2, deepspeed_config=str(user)),
                                           train=TrainConfig(precision="bf16")), Precision("bf16", torch.bfloat16),
                                    CPU)
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage=3 disagrees with dist.zero_stage"):
        build_deepspeed_config(Config(stage="x", dist=DistConfig(deepspeed_config=str(user))),
                               Precision("fp32", torch.float32), CPU)
    for owned in ({"optimizer": {"type": "Adam"}}, {"gradient_clipping": 1.0}):
        user.write_text(json.dumps(owned))
        with pytest.raises(ConfigError, match=f"'{next(iter(owned))}', which the run config owns"):
            build_deepspeed_config(Config(stage="x", dist=DistConfig(deepspeed_config=str(user))),
                                   Precision("fp32", torch.float32), CPU)
    # ZeRO-0 fp32: the Trainer clips (DeepSpeed's fp32 clipping fails on 0-dim parameters)
    zero0 = build_deepspeed_config(Config(stage="x", optim=OptimConfig(grad_clip=0.5)), Precision("fp32",
                                                                                                  torch.float32), CPU)
    assert zero0["gradient_clipping"] == 0.0 and trainer_clips_gradients(Config(stage="x"), Precision("fp32",
                                                                                                      torch.float32))
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    rng.seed_all(123)
    random.random(), np.random.rand(), torch.rand(1)
    torch.save({"rng": rng.capture()}, tmp_path / "s.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    rng.seed_all(5)
    rng.restore(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    with rng.isolated():
        torch.rand(10)
    before = torch.get_rng_state()
    with rng.isolated():
        random.random(), np.random.rand(), torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())


def test_ema_shards_consolidate_like_zero3():
    full = {"w": torch.arange(10.0).reshape(2, 5), "b": torch.arange(3.0)}
    world = 4
    shards = []
    for r in range(world):  # ZeRO-3 layout: ceil(numel/world) per rank, zero padding at the end
        shard = {}
        for name, t in full.items():
            per = -(-t.numel() // world)
            flat = torch.cat([t.reshape(-1), torch.zeros(per * world - t.numel())])
            shard[name] = flat[r * per:(r + 1) * per]
        shards.append(shard)
    out = consolidate(shards, {k: list(v.shape) for k, v in full.items()}, "test")
    assert all(torch.equal(out[k], full[k]) for k in full)


def test_manifest_detects_each_kind_of_damage(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 10)
    manifest.write_manifest(tmp_path, manifest.describe(tmp_path, manifest.list_files(tmp_path)))
    manifest.verify_checkpoint(tmp_path)
    data = bytearray((tmp_path / "a.bin").read_bytes())
    data[50] ^= 0xFF
    (tmp_path / "a.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"a\.bin: sha256 mismatch"):
        manifest.verify_checkpoint(tmp_path)
    (tmp_path / "sub" / "b.bin").unlink()
    with pytest.raises(CheckpointError, match=r"a\.bin: sha256 mismatch.*and 1 more"):
        manifest.verify_checkpoint(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match=r"b\.bin: missing"):
        manifest.verify_checkpoint(tmp_path)
    (tmp_path / manifest.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        manifest.verify_checkpoint(tmp_path)


def test_latest_and_prune(tmp_path):
    for step in (1, 2, 3, 4):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        manifest.write_manifest(d, {})
    (tmp_path / "step_00000005.partial").mkdir()  # an interrupted save is never a candidate
    (tmp_path / "step_00000006").mkdir()  # no manifest: incomplete
    write_latest(tmp_path, "step_00000002")
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == \
        ["step_00000002", "step_00000003", "step_00000004", "step_00000005.partial", "step_00000006"]
    assert find_latest(tmp_path).name == "step_00000002"
    write_latest(tmp_path, "step_00000009")  # dangling: falls back to the newest complete checkpoint
    assert find_latest(tmp_path).name == "step_00000004"


def test_metrics_truncation_drops_later_and_torn_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_sample_grid_png(tmp_path):
    save_grid(torch.rand(5, 3, 4, 6), tmp_path / "g.png")
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (18, 8)


def test_stage_import_path_in_config(tmp_path):
    cls = stage_class("trainer_toy_stage:ToyStage")
    assert cls.__name__ == "ToyStage"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: trainer_toy_stage:ToyStage\nmodel: {width: 4}\n")
    assert load_config(cfg).model.width == 4
    with pytest.raises(ConfigError, match="cannot import stage module 'no_such_module'"):
        stage_class("no_such_module:Stage")
    with pytest.raises(ConfigError, match="has no class 'Nope'"):
        stage_class("trainer_toy_stage:Nope")


class _PeerDist:
    """A fake process group: a peer rank that runs out of eval batches after `peer_batches` (for _lockstep)."""

    def __init__(self, peer_batches: int) -> None:
        self.peer_batches, self.calls = peer_batches, 0

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        assert op == "max"
        peer_exhausted = 1.0 if self.calls >= self.peer_batches else 0.0
        self.calls += 1
        return [max(values[0], peer_exhausted)]


def test_eval_lockstep_stops_every_rank_at_the_shortest_share():
    from types import SimpleNamespace

    from pipeline.train.trainer import Trainer

    mine = [{"i": i} for i in range(3)]
    shorter_peer = SimpleNamespace(dist=_PeerDist(peer_batches=2))
    assert [b["i"] for b in Trainer._lockstep(shorter_peer, mine)] == [0, 1]  # no third, unmatched forward
    longer_peer = SimpleNamespace(dist=_PeerDist(peer_batches=5))
    assert [b["i"] for b in Trainer._lockstep(longer_peer, mine)] == [0, 1, 2]
    assert longer_peer.dist.calls == 4  # the peer learns in one reduction that this rank has run out


def test_progress_bar_prints_each_evaluation_once(tmp_path, capsys):
    from pipeline.config import LogConfig
    from pipeline.train.metrics import MetricsSinks

    sinks = MetricsSinks(tmp_path, LogConfig(tensorboard=False, progress_bar=True), True, 0, 10)
    sinks.write({"step": 1, "loss": 0.5, "lr": 1e-3, "samples_per_sec": 10.0})
    sinks.write({"step": 2, "loss": 0.4, "lr": 1e-3, "samples_per_sec": 10.0, "eval/t2i_recall@1": 0.75})
    sinks.close()
    out = capsys.readouterr().out  # tqdm.write prints above the bar, on stdout
    assert out.count("eval/t2i_recall@1 0.75") == 1 and "step 2:" in out and "step 1:" not in out
