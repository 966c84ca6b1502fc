"""Real-image handling in decode_image: EXIF orientation, 16-bit greyscale, every colour mode to RGB with alpha on
white, too-small images skipped by default, and `shards from-folder` keeping (or only shrinking) the pixels."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_helpers import SPEC, data_config, good_sample, take, write_tar
from pipeline.cli.main import main
from pipeline.data.loader import build_train_loader
from pipeline.data.transforms import ImageOptions, SkipSample, decode_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _center(size: int = 16) -> ImageOptions:
    return ImageOptions(size, random_crop=False)


def test_16bit_greyscale_png_is_scaled_not_clipped():
    rng = np.random.default_rng()
    level = int(rng.integers(20000, 40000))  # ~46% grey: PIL's own conversion turned this into 255
    img = Image.fromarray(np.full((20, 24), level, np.uint16))  # mode I;16
    out = decode_image(_encode(img, "PNG"), _center(), 0)
    assert out.shape == (16, 16, 3)
    assert np.all(out == round(level / 257)), (level, np.unique(out))


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED), (1, None, None)])
def test_exif_orientation_is_applied(orientation, top, bottom):
    """Stored 48 x 24 with red on the left: EXIF 6 (rotate 90 clockwise to show) puts red on top, 8 at the bottom."""
    pixels = np.zeros((24, 48, 3), np.uint8)
    pixels[:, :24] = RED
    pixels[:, 24:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, ImageOptions(16, random_crop=False, max_aspect_ratio=0), 0).astype(int)
    if top is None:  # upright: a centre crop of a landscape image, red left, blue right
        assert np.abs(out[:, :4] - RED).max() < 40 and np.abs(out[:, -4:] - BLUE).max() < 40
        return
    assert np.abs(out[:4] - top).max() < 40 and np.abs(out[-4:] - bottom).max() < 40


def _hidden_green_rgba() -> np.ndarray:
    """Transparent everywhere (with green hidden under the transparency) except an opaque red middle."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[8:24, 8:24] = (*RED, 255)
    return rgba


def _palette_with_transparency() -> Image.Image:
    img = Image.fromarray(_hidden_green_rgba()[..., :3]).quantize(2)
    green = next(i for i, c in enumerate(np.asarray(img.getpalette()).reshape(-1, 3)[:2]) if tuple(c) == (0, 255, 0))
    img.info["transparency"] = green
    return img


@pytest.mark.parametrize("make", [
    lambda: Image.fromarray(_hidden_green_rgba(), "RGBA"),
    lambda: Image.fromarray(_hidden_green_rgba(), "RGBA").convert("LA"),
    _palette_with_transparency,
])
def test_transparency_is_composited_on_white(make):
    out = decode_image(_encode(make(), "PNG"), ImageOptions(32, random_crop=False), 0).astype(int)
    grey_red = np.asarray(Image.new("RGB", (1, 1), RED).convert("L")).item()
    middle = out[12:20, 12:20]
    assert np.all(out[:4, :4] == WHITE), out[0, 0]  # not the hidden green
    is_la = np.all(middle == grey_red)
    assert np.all(middle == RED) or is_la, middle[0, 0]


@pytest.mark.parametrize("mode, fmt, colour", [("L", "PNG", (90, 90, 90)), ("P", "PNG", (30, 160, 220)),
                                               ("CMYK", "JPEG", (200, 40, 60)), ("RGB", "WEBP", (10, 220, 90))])
def test_colour_modes_become_the_same_rgb(mode, fmt, colour):
    img = Image.new("RGB", (20, 20), colour)
    img = img.quantize(4) if mode == "P" else img.convert(mode)  # convert("P") would dither to the web palette
    out = decode_image(_encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {})), _center(), 0).astype(int)
    assert np.abs(out - colour).max() <= 6, (mode, out[0, 0])


def test_tiny_images_are_skipped_by_default_and_counted(tmp_path):
    """data.min_image_size defaults to auto (32 px, or the output size if smaller): a 1x1 image is not upscaled."""
    tiny = {"png": _encode(Image.new("RGB", (1, 1), RED), "PNG"), "txt": b"a single pixel"}
    write_tar(tmp_path / "shard-000000.tar", [*(good_sample(i) for i in range(6)), ("t_tiny", tiny)])
    loader = build_train_loader(data_config(tmp_path), SPEC, batch_size=3, seed=0, rank=0, world_size=1)
    keys = [k for batch in take(iter(loader), 5) for k in batch["key"]]
    loader.close()
    assert "t_tiny" not in keys and loader.skip_counts() == {"image_too_small": 2}  # read twice in 15 samples
    with pytest.raises(SkipSample, match="image_too_small"):
        decode_image(tiny["png"], ImageOptions(12, False, min_image_size=12), 0)


def test_from_folder_keeps_bytes_and_max_side_only_shrinks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    big = _encode(Image.new("RGB", (120, 60), RED), "JPEG", quality=90, exif=exif.tobytes())
    small = _encode(Image.new("RGBA", (30, 20), (1, 2, 3, 128)), "PNG")
    stripes = np.zeros((50, 80, 3), np.uint8)
    stripes[:, ::2] = RED  # one-pixel stripes: a smooth shrink gives their mean, nearest neighbour one of them
    palette = _encode(Image.fromarray(stripes).quantize(2), "PNG")
    (src / "palette.png").write_bytes(palette)
    (src / "big.jpg").write_bytes(big)
    (src / "small.png").write_bytes(small)
    for stem in ("big", "small", "palette"):
        (src / f"{stem}.txt").write_text(stem)
    stored = {}
    for name, extra in (("keep", []), ("shrink", ["--max-side", "40"])):
        assert main(["shards", "from-folder", str(src), "--out", str(tmp_path / name), *extra]) == 0
        with tarfile.open(tmp_path / name / "shard-000000.tar") as tar:
            stored[name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert stored["keep"]["big.jpg"] == big and stored["keep"]["small.png"] == small
    assert stored["shrink"]["small.png"] == small  # never enlarged, never re-encoded
    shrunk = Image.open(io.BytesIO(stored["shrink"]["big.jpg"]))
    assert shrunk.size == (20, 40)  # upright first (EXIF 6 shows 60 x 120), then long side 40
    shrunk_palette = np.asarray(Image.open(io.BytesIO(stored["shrink"]["palette.png"])).convert("RGB")).astype(int)
    assert shrunk_palette.shape == (25, 40, 3) and np.abs(shrunk_palette[5:-5, 5:-5] - (128, 0, 0)).max() <= 12
    assert json.loads((tmp_path / "shrink" / "shards.json").read_text())["shrunk"] == 2
