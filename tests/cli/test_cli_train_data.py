"""`python -m pipeline train` on real-world-shaped data: bad samples are skipped and reported, a shard spec that
matches nothing is a clear error within seconds."""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import yaml
from train_helpers import subprocess_env

from pipeline.data.synthetic import make_sample, write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


def tiny_clip_config(path: Path, urls: list[str]) -> Path:
    raw = {
        "stage": "clip",
        "model": {"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                              "head_width": 16},
                  "text": {"context_length": 24, "width": 32, "heads": 2, "layers": 1}},
        "data": {"urls": urls, "resolution": 16, "num_workers": 2, "shuffle_buffer": 8},
        "train": {"max_steps": 20, "micro_batch_size": 8, "log_every": 10},  # > 1 epoch
        "ckpt": {"every_steps": 20},
        "log": {"tensorboard": False, "progress_bar": False},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def add(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    for ext, data in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def bad_shards(root: Path) -> list[str]:
    good = write_synthetic_shards(root / "good", 96, 32, 16, 0)
    with tarfile.open(root / "mixed.tar", "w") as tar:
        for i in range(12):
            key, members = make_sample(1000 + i, 0, "train", 16)
            if i == 3:
                members["jpg"] = b"\xff\xd8\xff\xe0 corrupt jpeg"
            if i == 7:
                del members["txt"]
            add(tar, key, members)
    whole = (root / "good" / good["shards"][0]["url"]).read_bytes()
    (root / "truncated.tar").write_bytes(whole[: len(whole) // 2 + 777])
    return [str(root / "good"), str(root / "mixed.tar"), str(root / "truncated.tar")]


def run_train(config: Path, run_dir: Path, timeout: float = 300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "pipeline", "train", str(config), "--run-dir", str(run_dir)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_training_on_bad_shards_finishes_and_reports_skips_by_reason(tmp_path):
    config = tiny_clip_config(tmp_path / "run.yaml", bad_shards(tmp_path))
    result = run_train(config, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    seen: dict[str, int] = {}
    for record in records:
        for reason, count in record["skipped"].items():
            seen[reason] = max(seen.get(reason, 0), count)
    assert seen["corrupt_image"] >= 1 and seen["missing_caption"] >= 1 and seen["truncated_shard"] >= 1
    assert result.stderr.count("skipping corrupt_image") == 1  # logged once, then only counted


def test_shard_spec_matching_nothing_fails_fast_with_one_line(tmp_path):
    config = tiny_clip_config(tmp_path / "run.yaml", [str(tmp_path / "nowhere" / "shard-{000000..000009}.tar")])
    start = time.monotonic()
    result = run_train(config, tmp_path / "run", timeout=120)
    assert result.returncode == 1
    assert time.monotonic() - start < 60
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nowhere" in last and "Traceback" not in result.stderr
