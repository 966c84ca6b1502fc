"""unCLIP: a base U-Net conditioned on CLIP image embeddings (precomputed true embeddings at training) samples
through a bundle with the prior providing the embedding; DALL-E 2 variations (image embedding alone, from the
Python API and `sample --image` without a prompt) and interpolation between two images' embeddings."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.bundle import add_component
from pipeline.cli.main import main
from pipeline.export import export_run
from pipeline.sampling.text2image import Text2Image, to_pil
from prior_helpers import TINY_CLIP, export_tiny_clip, prior_config
from train_helpers import read_metrics, train_inprocess
from unet_helpers import unet_config

PROMPT = "a large red circle on the left"


@pytest.fixture(scope="module")
def bundle(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip")
    clip = export_tiny_clip(root / "clip", seed=1)
    pre = root / "pre"
    for split in ("train", "heldout"):
        assert main(["shards", "precompute", str(shards / split), "--out", str(pre / split),
                     "--encoder", f"clip-image:{clip}"]) == 0
    bundle = root / "bundle"
    shutil.copytree(clip, bundle / "clip")
    add_component(bundle, "clip", {"kind": "clip"})
    assert train_inprocess(prior_config(shards, bundle / "clip", train={"max_steps": 2}, eval={"every_steps": 2}),
                           root / "prior") == 0
    export_run(root / "prior", bundle)
    raw = unet_config(shards, model={"image_embed": {"dim": TINY_CLIP["embed_dim"], "clip": str(bundle / "clip")}},
                      data={"precomputed_urls": str(pre / "train"), "eval_precomputed_urls": str(pre / "heldout")})
    assert train_inprocess(raw, root / "base") == 0
    assert "eval/fidelity_colour" in read_metrics(root / "base")[-1]  # evaluated with the true embeddings
    export_run(root / "base", bundle)
    return bundle


def test_prompts_go_through_the_prior_and_images_give_variations(bundle, tmp_path):
    t2i = Text2Image.from_bundle(bundle)
    assert t2i.levels[0].cond.image_embed_dim == TINY_CLIP["embed_dim"]
    images = t2i.generate(PROMPT, num_images=2, steps=4, seed=1)
    assert images.shape == (2, 3, 16, 16)
    source = to_pil(images[:1])[0]
    with_text = t2i.generate(PROMPT, image=source, steps=4)
    without_text = t2i.variations(source, num_images=3, steps=4)
    assert with_text.shape == (1, 3, 16, 16) and without_text.shape == (3, 3, 16, 16)
    assert not torch.allclose(without_text[0], without_text[1])
    frames = t2i.interpolate(PROMPT, source, to_pil(images[1:])[0], frames=3, steps=4)
    assert len(frames) == 3
    source.save(tmp_path / "source.png")
    assert main(["sample", str(bundle), "--image", str(tmp_path / "source.png"), "--num-images", "2",
                 "--steps", "4", "--out", str(tmp_path / "variations.png")]) == 0
    assert (tmp_path / "variations.png").is_file()


def test_bucketed_unclip_base_trains_on_wide_and_tall_images_and_samples_variations_at_their_shapes(tmp_path):
    """Issue 21: the unCLIP base stage with aspect-ratio buckets. The U-Net sees each image at its bucket shape while
    its CLIP image embedding (precomputed, aligned by key) is CLIP's own square view of the image; the bundle samples
    variations at a wide bucket shape."""
    mixed = tmp_path / "mixed"
    assert main(["shards", "synthetic", "--out", str(mixed), "--num-samples", "48", "--shard-size", "48",
                 "--resolution", "16", "--aspect-ratios", "1:1,16:9,9:16"]) == 0
    clip = export_tiny_clip(tmp_path / "clip", seed=1)
    assert main(["shards", "precompute", str(mixed), "--out", str(tmp_path / "pre"),
                 "--encoder", f"clip-image:{clip}"]) == 0
    raw = unet_config(tmp_path, model={"image_embed": {"dim": TINY_CLIP["embed_dim"], "clip": str(clip)},
                                       "eval_prompts": 0},
                      data={"urls": str(mixed), "precomputed_urls": str(tmp_path / "pre"), "eval_urls": "",
                            "num_workers": 0, "buckets": {"enabled": True, "step": 4}},
                      train={"max_steps": 3, "sample_every": 0}, eval={"every_steps": 0})
    assert train_inprocess(raw, tmp_path / "run") == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    bundle = tmp_path / "bundle"
    shutil.copytree(clip, bundle / "clip")
    add_component(bundle, "clip", {"kind": "clip"})
    export_run(tmp_path / "run", bundle)
    t2i = Text2Image.from_bundle(bundle)
    assert (12, 20) in t2i.levels[0].shapes
    source = to_pil(torch.rand(1, 3, 12, 20) * 2 - 1)[0]  # a wide image: CLIP embeds its centre square
    wide = t2i.variations(source, num_images=2, steps=2, height=12, width=20)
    assert wide.shape == (2, 3, 12, 20) and torch.isfinite(wide).all()
