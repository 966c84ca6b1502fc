"""The real loading path of the TF-Inception weights, exercised with a randomly initialised network of the same
architecture saved where the weights file would be; wrong or missing files are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import NoTrainInceptionV3

from eval_helpers import save_random_inception, scenes
from pipeline.errors import ConfigError
from pipeline.eval.inception import clean_resize, load_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "weights-inception.pth")


def test_loads_from_a_path_and_matches_torchmetrics_inception(weights):
    extractor = load_inception(weights)
    images, _ = scenes(2, resolution=32)
    ours = extractor(images)  # float [0, 1] -> uint8 -> clean resize to 299 -> pool features
    assert ours.shape == (2, 2048) and ours.dtype == torch.float64 and torch.isfinite(ours).all()
    assert len(extractor.digest) == 64
    theirs = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    prepared = clean_resize((images * 255).round().to(torch.uint8), 299)
    with torch.no_grad():
        expected = theirs(prepared).double()
    assert ours.std() > 0
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_clean_resize_is_pil_bicubic_per_channel_in_float():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    images = torch.randint(0, 256, (1, 3, 13, 13), generator=g, dtype=torch.uint8)
    out = clean_resize(images, 29)
    channel = Image.fromarray(images[0, 1].numpy().astype(np.float32), mode="F").resize((29, 29), Image.BICUBIC)
    expected = np.rint(np.asarray(channel).clip(0, 255))
    assert out.shape == (1, 3, 29, 29) and out.dtype == torch.uint8
    assert np.array_equal(out[0, 1].numpy(), expected)


@pytest.mark.parametrize("content", ["missing", "garbage", "other_network", "empty"])
def test_a_missing_or_wrong_weights_file_is_one_line(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "garbage":
        path.write_bytes(b"\x00 definitely not a checkpoint")
    elif content == "other_network":
        torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ConfigError, match="eval.inception_weights") as info:
        load_inception("" if content == "empty" else path)
    assert "\n" not in str(info.value)
