"""Sampling at any shape the cascade was trained on: `sample --height H --width W`, Text2Image.generate(height=,
width=); other shapes fail with one line naming the nearest valid ones; the bundle records each stage's buckets."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from pipeline.cli.main import main
from pipeline.data.buckets import bucket_shapes
from pipeline.errors import UsageError
from pipeline.export import export_run
from pipeline.sampling.shapes import cascade_shapes, nearest, valid_shapes
from pipeline.sampling.text2image import Text2Image
from train_helpers import train_inprocess
from unet_helpers import unet_config

PROMPT = "a large red circle on the left"


@dataclass
class FakeLevel:
    name: str
    resolution: int
    shapes: tuple[tuple[int, int], ...]


def test_valid_shapes_are_those_every_level_makes_scaled_along_the_cascade():
    base = FakeLevel("base", 8, ((8, 8), (4, 16), (16, 4), (6, 10)))
    sr = FakeLevel("sr", 16, ((16, 16), (8, 32), (32, 8), (12, 20), (10, 26)))
    assert valid_shapes([base, sr]) == [(32, 8), (16, 16), (12, 20), (8, 32)]
    assert cascade_shapes([base, sr], 12, 20) == [(6, 10), (12, 20)]
    with pytest.raises(UsageError) as err:  # (10, 26) is a bucket of sr, but base would need 5 x 13
        cascade_shapes([base, sr], 10, 26)
    message = str(err.value)
    assert "\n" not in message and "cannot make 10x26" in message and "nearest valid: 8x32, 12x20, 16x16" in message
    with pytest.raises(UsageError, match="cannot make 9x30"):  # half of it is not whole pixels
        cascade_shapes([base, sr], 9, 30)
    assert nearest([(8, 8), (4, 16), (16, 4)], (5, 15), 1) == [(4, 16)]


@pytest.fixture(scope="module")
def bucketed(shards, tmp_path_factory):
    """A tiny 16 px base stage trained (2 steps) on buckets of step 4, exported."""
    root = tmp_path_factory.mktemp("bucketed")
    raw = unet_config(shards, data={"buckets": {"enabled": True, "step": 4}},
                      train={"max_steps": 2, "sample_every": 0}, eval={"every_steps": 0})
    assert train_inprocess(raw, root / "run") == 0
    export_run(root / "run", root / "bundle")
    return root / "bundle"


def test_bundle_records_buckets_and_generate_makes_each_of_them(bucketed):
    meta = json.loads((bucketed / "unet_base" / "t2i_stage.json").read_text())
    expected = bucket_shapes(16, 8, 32, 4)
    assert [tuple(s) for s in meta["buckets"]] == list(expected) and (8, 32) in expected
    t2i = Text2Image.from_bundle(bucketed)
    assert t2i.levels[0].shapes == expected
    square = t2i.generate(PROMPT, steps=2, seed=1)
    assert square.shape == (1, 3, 16, 16)
    torch.testing.assert_close(t2i.generate(PROMPT, steps=2, seed=1, height=16, width=16), square, atol=0, rtol=0)
    for height, width in ((8, 32), (32, 8), (12, 20)):
        images = t2i.generate(PROMPT, steps=2, seed=1, num_images=2, height=height, width=width)
        assert images.shape == (2, 3, height, width) and torch.isfinite(images).all()
        assert not torch.allclose(images[0], images[1])
    with pytest.raises(UsageError, match=r"cannot make 16x30 .*nearest valid: 12x20, 8x24, 8x28$"):
        t2i.generate(PROMPT, steps=2, height=16, width=30)
    with pytest.raises(UsageError, match="must be positive"):
        t2i.generate(PROMPT, steps=2, height=0, width=16)
    init = Image.new("RGB", (64, 20), (255, 0, 0))  # image-to-image from a wide image at a wide shape
    edited = t2i.generate(PROMPT, steps=2, height=8, width=24, init_image=init, strength=0.5)
    assert edited.shape == (1, 3, 8, 24)


def test_cli_height_and_width(bucketed, tmp_path, capsys):
    out = tmp_path / "wide.png"
    assert main(["sample", str(bucketed), "--prompt", PROMPT, "--out", str(out), "--steps", "2",
                 "--height", "8", "--width", "32"]) == 0
    with Image.open(out) as image:
        assert image.size == (32, 8)
    capsys.readouterr()
    assert main(["sample", str(bucketed), "--prompt", PROMPT, "--out", str(out), "--height", "17"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "cannot make 17x16" in err, err
