"""Strict typed config loading: unknown keys, wrong types, overrides, round trip, shipped YAMLs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import Config, DataConfig, dump_config, load_config
from pipeline.config_schema import check, doc, field_types
from pipeline.errors import ConfigError
from pipeline import registry

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ToyVision:
    width: int = doc(32, "Channels.")
    layers: int = doc(2, "Blocks.")


@dataclass(frozen=True)
class ToyModelConfig:
    embed_dim: int = doc(16, "Embedding width.")
    vision: ToyVision = doc(ToyVision(), "Vision tower.")
    name: str = doc("toy", "Model name.")

    def __post_init__(self) -> None:
        check(self.embed_dim > 0, "model.embed_dim", f"must be > 0, got {self.embed_dim}")


class ToyStage:
    model_config_cls = ToyModelConfig


@pytest.fixture(autouse=True)
def toy_stage(monkeypatch):
    monkeypatch.setitem(registry.STAGES, "toy", f"{__name__}:ToyStage")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_loads_sections_with_types(tmp_path):
    cfg = load_config(write(tmp_path, """
stage: toy
model: {embed_dim: 8, vision: {width: 64}}
data: {urls: [a.tar, b.tar], resolution: 32}
optim: {lr: 1e-4, betas: [0.8, 0.9]}
train: {max_steps: 5, micro_batch_size: 2, seed: 3}
dist: {zero_stage: 2}
ckpt: {every_steps: 2, keep_last: 1}
"""))
    assert cfg.model == ToyModelConfig(embed_dim=8, vision=ToyVision(width=64))
    assert cfg.data.urls == ("a.tar", "b.tar") and cfg.data.resolution == 32
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.betas == (0.8, 0.9)  # '1e-4' is a YAML string
    assert (cfg.train.max_steps, cfg.train.micro_batch_size, cfg.train.seed) == (5, 2, 3)
    assert cfg.dist.zero_stage == 2 and cfg.ckpt.keep_last == 1
    assert cfg.eval == Config().eval  # absent sections keep their defaults


def test_unknown_key_names_file_path_and_suggestion(tmp_path):
    path = write(tmp_path, "stage: toy\ntrain:\n  max_step: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "'train.max_step'" in msg and "did you mean 'train.max_steps'" in msg


def test_unknown_nested_model_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model\.vision\.widht'; did you mean 'model\.vision\.width'"):
        load_config(write(tmp_path, "stage: toy\nmodel: {vision: {widht: 3}}\n"))


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'; did you mean 'train'"):
        load_config(write(tmp_path, "stage: toy\ntrian: {}\n"))


@pytest.mark.parametrize("text, expected", [
    ("train: {max_steps: abc}", r"train\.max_steps expects int, got 'abc' \(str\)"),
    ("train: {max_steps: 1.5}", r"train\.max_steps expects int, got 1\.5 \(float\)"),
    ("train: {max_steps: true}", r"train\.max_steps expects int, got True \(bool\)"),
    ("data: {crop: middle}", r"data\.crop expects one of 'random', 'center', got 'middle'"),
    ("optim: {betas: [0.9]}", r"optim\.betas expects list of 2 values"),
    ("train: 3", r"train expects mapping \(TrainConfig\)"),
])
def test_wrong_type_names_key_type_and_value(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, "stage: toy\n" + text + "\n"))


def test_invalid_value_is_rejected_with_key(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml: dist\.zero_stage must be 0, 1, 2 or 3, got 4"):
        load_config(write(tmp_path, "stage: toy\ndist: {zero_stage: 4}\n"))
    with pytest.raises(ConfigError, match=r"model\.embed_dim must be > 0"):
        load_config(write(tmp_path, "stage: toy\nmodel: {embed_dim: 0}\n"))


def test_missing_or_unknown_stage(tmp_path):
    with pytest.raises(ConfigError, match="top-level key 'stage' is required"):
        load_config(write(tmp_path, "train: {max_steps: 3}\n"))
    with pytest.raises(ConfigError, match="unknown stage 'tyo'"):
        load_config(write(tmp_path, "stage: tyo\n"))


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "stage: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_overrides_parse_to_field_types(tmp_path):
    cfg = load_config(write(tmp_path, "stage: toy\n"), [
        "train.max_steps=7", "optim.lr=3e-4", "log.tensorboard=false", "optim.betas=0.5,0.6",
        "model.vision.layers=4", "model.name=007", "data.urls=dir/shard-{000000..000003}.tar",
        "data.eval_urls=[a.tar, b.tar]", "dist.zero_stage=3"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.log.tensorboard is False and cfg.optim.betas == (0.5, 0.6)
    assert cfg.model.vision.layers == 4 and cfg.model.name == "007"  # strings stay verbatim
    assert cfg.data.urls == "dir/shard-{000000..000003}.tar" and cfg.data.eval_urls == ("a.tar", "b.tar")
    assert cfg.dist.zero_stage == 3


@pytest.mark.parametrize("override, expected", [
    ("nonexistent.key=1", r"unknown key 'nonexistent'"),
    ("train.max_step=1", r"unknown key 'train\.max_step'; did you mean 'train\.max_steps'"),
    ("train.max_steps=ten", r"train\.max_steps expects int, got 'ten'"),
    ("train=3", r"'train' is a section"),
    ("train.max_steps.x=3", r"'train\.max_steps' is a value, not a section"),
    ("novalue", r"expected KEY=VALUE"),
])
def test_bad_overrides(tmp_path, override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, "stage: toy\n"), [override])


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "stage: toy\nmodel: {vision: {width: 8}}\ndata: {urls: [x.tar]}\n"),
                      ["optim.betas=[0.1, 0.2]"])
    again = write(tmp_path, dump_config(cfg))
    assert load_config(again) == cfg


def test_every_field_is_documented():
    def walk(cls):
        for name, tp in field_types(cls).items():
            field = cls.__dataclass_fields__[name]
            assert field.metadata.get("doc"), f"{cls.__name__}.{name} has no documentation"
            if hasattr(tp, "__dataclass_fields__"):
                walk(tp)
    walk(Config)
    walk(DataConfig)


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").rglob("*.yaml"))
    for path in paths:
        if "deepspeed" in path.parts:
            continue  # DeepSpeed JSON-style presets, not run configs
        cfg = load_config(path)
        assert cfg.stage in registry.STAGES
