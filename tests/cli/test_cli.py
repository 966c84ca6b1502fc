"""The command-line contract: subcommands, --help, exit codes and one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


@pytest.mark.parametrize("command", ["shards", "train", "export", "sample", "demo", "eval-stats", "evaluate"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m pipeline " + command in capsys.readouterr().out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])  # CONFIG and --run-dir missing
    assert exit_info.value.code == 2


def test_shards_synthetic_via_subprocess(tmp_path):
    result = run_cli("shards", "synthetic", "--out", str(tmp_path), "--num-samples", "64", "--shard-size", "16",
                     "--resolution", "16", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "wrote 64 train samples in 4 shards" in result.stdout
    assert len(list(tmp_path.glob("*.tar"))) == 4


def test_config_error_is_one_line_and_exits_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("stage: nothing\n")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "unknown stage 'nothing'" in err
    assert "Traceback" not in err


def test_debug_flag_shows_the_exception(tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["train", str(tmp_path / "missing.yaml"), "--run-dir", str(tmp_path), "--debug"])


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_unknown_override_on_every_shipped_config_exits_2_naming_the_key(config, tmp_path, capsys):
    assert main(["train", str(REPO / config), "--run-dir", str(tmp_path), "--set", "nonexistent.key=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nonexistent.key" in err and not (tmp_path / "checkpoints").exists()


def test_one_set_takes_several_overrides_and_repeated_sets_still_work(tmp_path, capsys):
    from pipeline.cli.main import build_parser
    from pipeline.config import load_config

    config = str(REPO / "configs" / "demo" / "clip.yaml")
    args = build_parser().parse_args(["train", config, "--run-dir", str(tmp_path), "--set", "train.max_steps=7",
                                      "optim.lr=0.5", "--set", "train.seed=3", "train.max_steps=9"])
    assert args.overrides == ["train.max_steps=7", "optim.lr=0.5", "train.seed=3", "train.max_steps=9"]
    cfg = load_config(args.config, args.overrides)
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.train.seed) == (9, 0.5, 3)  # later overrides win
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--set train.max_steps=100 optim.lr=1e-4" in help_text and "--set optim.lr=1e-4)" in help_text
