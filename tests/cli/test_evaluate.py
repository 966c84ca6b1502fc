"""``python -m pipeline evaluate``: a tiny one-stage bundle sampled at two guidance scales; FID/KID against the
prompt shards' own images, CLIP score with a given CLIP; report.json, table.md, the plot and the grids."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.cli.main import main
from pipeline.export import export_run
from eval_helpers import save_random_inception
from prior_helpers import export_tiny_clip
from train_helpers import train_inprocess
from unet_helpers import unet_config

# A random tiny CLIP whose image and caption embeddings have positive cosines on noise-like images (seeds 0 and 1
# give only negative ones, which CLIP score clips to 0 and would make its comparisons prove nothing).
CLIP_SEED = 3


@pytest.fixture(scope="module")
def setup(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    raw = unet_config(shards, data={"resolution": 8}, model={"unet": {"channels": 16, "channel_mult": [1, 2],
                                                                      "attention_resolutions": [4], "head_width": 8,
                                                                      "norm_groups": 8}, "eval_prompts": 0},
                      train={"max_steps": 1, "sample_every": 0}, eval={"every_steps": 0})
    assert train_inprocess(raw, root / "run") == 0
    export_run(root / "run", root / "bundle")
    clip = export_tiny_clip(root / "clip", seed=CLIP_SEED)
    return root / "bundle", save_random_inception(root / "inception.pth"), clip


def test_writes_table_plot_grids_and_report_per_guidance(setup, shards, tmp_path, capsys):
    bundle, weights, clip = setup
    out = tmp_path / "eval"
    code = main(["evaluate", str(bundle), "--prompts", str(shards / "heldout"), "--num-images", "2",
                 "--guidance", "1,3", "--out", str(out), "--inception-weights", str(weights), "--clip", str(clip),
                 "--steps", "2", "--batch-size", "1", "--kid-subsets", "2"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [r["guidance"] for r in report["rows"]] == [1.0, 3.0] and report["num_images"] == 2
    for row in report["rows"]:
        assert row["images"] == 2 and row["fid"] > 0.1 and 0 < row["clip_score"] <= 100 and "kid" in row, row
    assert report["rows"][0]["fid"] != report["rows"][1]["fid"]  # guidance changed the images
    assert (out / "table.md").read_text().count("\n") == 4
    assert Image.open(out / "fid_vs_clip_score.png").size == (480, 480)
    assert Image.open(out / "grid_guidance_3.png").size == (16, 8)  # 2 images of 8 px side by side
    assert "guidance 3: fid" in capsys.readouterr().out


def test_prompt_file_without_images_gives_clip_score_only(setup, tmp_path, capsys):
    bundle, _, clip = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle on the left\n\na small blue square at the top\n")
    out = tmp_path / "eval"
    assert main(["evaluate", str(bundle), "--prompts", str(prompts), "--num-images", "5", "--guidance", "2",
                 "--out", str(out), "--clip", str(clip), "--steps", "2"]) == 0, capsys.readouterr().err
    (row,) = json.loads((out / "report.json").read_text())["rows"]
    assert row["images"] == 2 and "fid" not in row and "kid" not in row and row["clip_score"] > 0
    assert not (out / "fid_vs_clip_score.png").exists()
    code = main(["evaluate", str(bundle), "--prompts", str(prompts), "--num-images", "2", "--out", str(out),
                 "--fid-stats", "x.npz"])
    assert code == 2 and "--inception-weights" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_write_the_report_of_one(setup, shards, tmp_path):
    import subprocess
    import sys

    from train_helpers import REPO, subprocess_env

    bundle, weights, clip = setup
    found = []
    for nproc in (1, 2):
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc_per_node={nproc}"]
        out = tmp_path / f"eval{nproc}"
        done = subprocess.run([*launcher, "-m", "pipeline", "evaluate", str(bundle), "--prompts",
                               str(shards / "heldout"), "--num-images", "3", "--guidance", "2", "--out", str(out),
                               "--inception-weights", str(weights), "--clip", str(clip), "--steps", "2",
                               "--batch-size", "1", "--kid-subsets", "2"],
                              cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        found.append(json.loads((out / "report.json").read_text())["rows"][0])
    one, two = found
    assert one["images"] == two["images"] == 3 and one["fid"] > 0.1 and one["clip_score"] > 0
    for key in ("fid", "kid", "clip_score"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-12), key
