"""The optional per-sample loss mask (KEY.mask.png): cropped and resized exactly with its image, 255 where a sample
has none, a corrupt or mis-shaped mask counted as a skip."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from data_helpers import data_config, toy_tokenize, write_tar
from pipeline.data.loader import build_eval_loader
from pipeline.data.spec import SampleSpec

SIDE = 12


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_masks_follow_the_image_crop_and_default_to_full_weight(tmp_path):
    rng = np.random.default_rng(0)
    samples, images = [], {}
    for i in range(6):
        # wider than tall at the output height: the crop only shifts, the resize is the identity, so the mask
        # (here the image's red channel) must come out as exactly the red channel of the delivered image
        image = rng.integers(0, 256, size=(SIDE, SIDE + 5, 3), dtype=np.uint8)
        members = {"png": png(image), "txt": f"caption {i}".encode()}
        if i % 2 == 0:
            members["mask.png"] = png(image[..., 0].copy())
        images[f"s{i:05d}"] = image
        samples.append((f"s{i:05d}", members))
    samples.append(("s00006", {"png": png(images["s00000"]), "txt": b"bad mask", "mask.png": b"not a png"}))
    samples.append(("s00007", {"png": png(images["s00000"]), "txt": b"square mask",
                               "mask.png": png(np.zeros((SIDE, SIDE), np.uint8))}))
    url = write_tar(tmp_path / "masks.tar", samples)
    spec = SampleSpec(image_size=SIDE, tokenize=toy_tokenize, loss_mask=True)
    data = data_config(url, eval_urls=str(url), resolution=SIDE)
    loader = build_eval_loader(data, spec, batch_size=8, max_samples=8, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["loss_mask"].shape == (6, 1, SIDE, SIDE) and batch["loss_mask"].dtype == torch.uint8
    for i, key in enumerate(batch["key"]):
        mask = batch["loss_mask"][i, 0].numpy()
        if int(key[1:]) % 2 == 0:
            np.testing.assert_array_equal(mask, batch["image"][i, 0].numpy())
        else:
            assert (mask == 255).all()
    assert loader.skip_counts() == {"corrupt_mask": 2}
    plain = build_eval_loader(data, SampleSpec(image_size=SIDE, tokenize=toy_tokenize), batch_size=8, max_samples=8,
                              rank=0, world_size=1)
    assert "loss_mask" not in next(iter(plain))  # masks are read only when the stage asks for them

