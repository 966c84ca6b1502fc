"""``shards precompute --encoder latents:AE_DIR[:std]``: scaled latents aligned with the source shards, read back by
the data loader as precomputed arrays, equal to encoding the loader's images directly (float16 storage)."""
from __future__ import annotations

import json

import pytest
import torch

from ae_helpers import export_tiny_autoencoder
from pipeline.cli.main import main
from pipeline.config import DataConfig
from pipeline.data.loader import build_eval_loader
from pipeline.data.spec import SampleSpec, normalize_images
from pipeline.stages.autoencoder import load_codec


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_precomputed_latents_round_trip_through_the_loader(kind, shards, tmp_path):
    ae_dir, pre = tmp_path / "autoencoder", tmp_path / "latents"
    export_tiny_autoencoder(ae_dir, kind)
    src = shards / "heldout"
    assert main(["shards", "precompute", str(src), "--out", str(pre), "--batch-size", "5",
                 "--encoder", f"latents:{ae_dir}:std"]) == 0
    index = json.loads((pre / "shards.json").read_text())
    assert index["arrays"] == {"latent": {"dtype": "float16", "shape": [4, 4, 4], "encoder": "latents"},
                               "latent_std": {"dtype": "float16", "shape": [4, 4, 4], "encoder": "latents"}}
    described = index["encoders"][0]
    assert described["kind"] == kind and described["image_size"] == 16 and described["with_std"]
    codec = load_codec(ae_dir)
    assert described["scaling_factor"] == codec.scale == pytest.approx(1 / (4.0 - 0.09) ** 0.5 if kind == "kl"
                                                                        else 0.5)
    spec = SampleSpec(image_size=16, precomputed=("latent", "latent_std"))
    data = DataConfig(eval_urls=str(src), eval_precomputed_urls=str(pre), resolution=16, num_workers=0)
    seen = 0
    for batch in build_eval_loader(data, spec, batch_size=8, max_samples=100, rank=0, world_size=1):
        assert batch["latent"].dtype == torch.float16 and batch["latent"].shape == (len(batch["key"]), 4, 4, 4)
        with torch.no_grad():
            mean, std = codec.latent_distribution(normalize_images(batch["image"], spec, "cpu", torch.float32))
        assert torch.allclose(batch["latent"].float(), mean, atol=2e-3, rtol=2e-3)
        assert torch.allclose(batch["latent_std"].float(), std, atol=2e-3, rtol=2e-3)
        assert (std.abs().sum() > 0) == (kind == "kl")
        seen += len(batch["key"])
    assert seen == 32


def test_latent_options_and_bad_arguments(shards, tmp_path, capsys):
    ae_dir = tmp_path / "autoencoder"
    export_tiny_autoencoder(ae_dir, "kl")
    assert main(["shards", "precompute", str(shards / "heldout"), "--out", str(tmp_path / "o"),
                 "--encoder", f"latents:{tmp_path / 'missing'}"]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert main(["shards", "precompute", str(shards / "heldout"), "--out", str(tmp_path / "o"),
                 "--encoder", f"latents:{ae_dir}:18"]) == 2
    assert "not divisible by the autoencoder's downsampling factor 4" in capsys.readouterr().err
    assert main(["shards", "precompute", str(shards / "heldout"), "--out", str(tmp_path / "o32"),
                 "--encoder", f"latents:{ae_dir}:32"]) == 0
    index = json.loads((tmp_path / "o32" / "shards.json").read_text())
    assert index["arrays"]["latent"]["shape"] == [4, 8, 8] and "latent_std" not in index["arrays"]
