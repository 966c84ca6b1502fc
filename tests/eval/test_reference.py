"""Real images for reference statistics: EXIF orientation applied, centre square crop, clean-fid resize to the
generated side; undecodable bytes are a counted skip."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import SkipSample
from pipeline.eval.inception import clean_resize
from pipeline.eval.reference import square_image


def _png(array: np.ndarray, orientation: int | None = None) -> bytes:
    image = Image.fromarray(array)
    buf = io.BytesIO()
    if orientation is None:
        image.save(buf, format="PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buf, format="PNG", exif=exif.tobytes())
    return buf.getvalue()


def test_centre_square_then_clean_resize():
    g = np.random.default_rng(int(torch.randint(0, 2**31, (1,))))
    wide = g.integers(0, 256, size=(10, 16, 3), dtype=np.uint8)  # H 10, W 16: columns 3..12 are the square
    out = square_image(_png(wide), 7)
    expected = clean_resize(torch.from_numpy(wide[:, 3:13].copy()).permute(2, 0, 1)[None], 7)[0]
    assert out.shape == (3, 7, 7) and out.dtype == torch.uint8
    assert torch.equal(out, expected)


def test_exif_orientation_is_applied_and_bad_bytes_are_a_skip():
    g = np.random.default_rng(int(torch.randint(0, 2**31, (1,))))
    square = g.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    rotated = square_image(_png(square, orientation=6), 6)  # 6: the viewer rotates 90 degrees clockwise
    assert torch.equal(rotated, torch.from_numpy(np.rot90(square, k=-1).copy()).permute(2, 0, 1))
    with pytest.raises(SkipSample, match="corrupt_image"):
        square_image(b"not an image", 8)
