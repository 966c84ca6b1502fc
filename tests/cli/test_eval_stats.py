"""``python -m pipeline eval-stats``: Inception statistics of real shard images, recorded with the extractor's digest
and the resolution; 2 ranks write the same statistics as 1."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from eval_helpers import save_random_inception
from pipeline.cli.main import main
from pipeline.errors import ConfigError
from pipeline.eval.frechet import FeatureStats, load_reference_stats
from pipeline.eval.inception import file_sha256, load_inception
from train_helpers import REPO, subprocess_env


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception.pth")


def _first_images(shard_dir, n: int) -> torch.Tensor:
    """uint8 (n, 3, 16, 16): the first n images of the shards, decoded with PIL alone."""
    images = []
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.name.endswith(".png") and len(images) < n:
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    return torch.stack(images)


def test_writes_statistics_of_the_real_images_with_digest_and_resolution(shards, weights, tmp_path, capsys):
    out = tmp_path / "stats.npz"
    code = main(["eval-stats", str(shards / "heldout"), "--out", str(out), "--inception-weights", str(weights),
                 "--num-samples", "6", "--resolution", "16", "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    assert "6 images at 16 px" in capsys.readouterr().out
    stats = load_reference_stats(out, file_sha256(weights), 16)
    expected = FeatureStats.of(load_inception(weights)(_first_images(shards / "heldout", 6)))
    assert stats.count == 6
    assert np.allclose(stats.mean, expected.mean().numpy(), rtol=1e-5, atol=1e-7)
    assert np.allclose(stats.covariance, expected.covariance().numpy(), rtol=1e-4, atol=1e-8)
    with pytest.raises(ConfigError, match="resolution 16"):
        load_reference_stats(out, file_sha256(weights), 32)


def test_missing_weights_is_one_line_exit_2(shards, tmp_path, capsys):
    code = main(["eval-stats", str(shards / "heldout"), "--out", str(tmp_path / "s.npz"),
                 "--inception-weights", str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--inception-weights" in err


@pytest.mark.slow
def test_two_ranks_write_the_statistics_of_one(shards, weights, tmp_path):
    def run(nproc: int) -> FeatureStats:
        out = tmp_path / f"stats{nproc}.npz"
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc_per_node={nproc}"]
        done = subprocess.run([*launcher, "-m", "pipeline", "eval-stats", str(shards / "heldout"), "--out", str(out),
                               "--inception-weights", str(weights), "--num-samples", "5", "--resolution", "24"],
                              cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        return load_reference_stats(out, file_sha256(weights), 24)

    one, two = run(1), run(2)
    assert one.count == two.count == 5
    assert np.allclose(one.mean, two.mean, rtol=1e-10, atol=1e-12)
    assert np.allclose(one.covariance, two.covariance, rtol=1e-8, atol=1e-10)
