"""The embedded synthetic dataset: shard layout, caption/metadata agreement, determinism, held-out split."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.synthetic import (COLOURS, HELDOUT_TUPLES, SceneObject, caption_for, make_sample,
                                     write_synthetic_shards)


def read_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_64_samples_in_shards_of_16(tmp_path):
    index = write_synthetic_shards(tmp_path, 64, 16, 32, seed=5)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(4)]
    assert index["num_samples"] == 64 and [s["num_samples"] for s in index["shards"]] == [16] * 4
    assert json.loads((tmp_path / "shards.json").read_text()) == index
    samples = read_samples(tmp_path)
    assert len(samples) == 64
    for key, sample in samples.items():
        assert set(sample) == {"jpg", "txt", "json"}, key
        meta = json.loads(sample["json"])
        objects = [SceneObject(**o) for o in meta["objects"]]
        assert sample["txt"].decode() == caption_for(objects)
        assert 1 <= len(objects) <= 2 and len({o.position for o in objects}) == len(objects)
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.size == (meta["width"], meta["height"]) == (32, 32) and image.mode == "RGB"


def test_pixels_show_the_described_shapes():
    """The drawn colour at each object's centre is the colour the caption names (last drawn wins)."""
    checked = 0
    for index in range(40):
        _, sample = make_sample(index, seed=11, split="train", resolution=64, image_format="png")
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int)
        objects = [SceneObject(**o) for o in json.loads(sample["json"])["objects"]]
        top = objects[-1]
        centre = pixels[int(top.cy), int(top.cx)]
        assert np.abs(centre - np.array(COLOURS[top.colour])).max() <= 12, (index, top, centre)
        checked += 1
    assert checked == 40


def test_same_seed_same_content_other_seed_differs(tmp_path):
    write_synthetic_shards(tmp_path / "a", 24, 10, 32, seed=3)
    write_synthetic_shards(tmp_path / "b", 24, 10, 32, seed=3)
    write_synthetic_shards(tmp_path / "c", 24, 10, 32, seed=4)
    a, b, c = (read_samples(tmp_path / d) for d in "abc")
    assert a == b
    for shard in (tmp_path / "a").glob("*.tar"):  # byte-identical shard files
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    assert [s["txt"] for s in a.values()] != [s["txt"] for s in c.values()]


def test_heldout_captions_never_appear_in_train(tmp_path):
    write_synthetic_shards(tmp_path / "train", 600, 300, 16, seed=0, split="train")
    write_synthetic_shards(tmp_path / "heldout", 200, 200, 16, seed=1, split="heldout")
    train = read_samples(tmp_path / "train")
    heldout = read_samples(tmp_path / "heldout")
    train_captions = {s["txt"] for s in train.values()}
    assert not train_captions & {s["txt"] for s in heldout.values()}
    for sample in train.values():
        objects = [SceneObject(**o) for o in json.loads(sample["json"])["objects"]]
        assert not any(o.attributes in HELDOUT_TUPLES for o in objects)
    for sample in heldout.values():
        objects = [SceneObject(**o) for o in json.loads(sample["json"])["objects"]]
        assert any(o.attributes in HELDOUT_TUPLES for o in objects)
    # every colour and shape is still taught by the train split
    seen = {(o["colour"], o["shape"]) for s in train.values() for o in json.loads(s["json"])["objects"]}
    assert len(seen) == len(COLOURS) * 3


def test_png_format_and_bad_arguments(tmp_path):
    index = write_synthetic_shards(tmp_path, 3, 2, 16, seed=0, image_format="png")
    assert index["num_shards"] == 2
    assert set(next(iter(read_samples(tmp_path).values()))) == {"png", "txt", "json"}
    with pytest.raises(ValueError):
        write_synthetic_shards(tmp_path / "x", 0, 2, 16, seed=0)


def test_parse_caption_inverts_caption_for_and_rejects_other_text():
    from pipeline.data.synthetic import make_sample, parse_caption

    for index in range(40):
        _, members = make_sample(index, 3, "heldout" if index % 2 else "train", 32)
        meta = json.loads(members["json"])
        parsed = parse_caption(members["txt"].decode())
        assert [o.attributes for o in parsed] == [tuple(o[k] for k in ("size", "colour", "shape", "position"))
                                                  for o in meta["objects"]]
    for text in ("a photo of a dog", "a large red circle", "a huge red circle on the left",
                 "a large red circle on the left and a small blue square at the top and a large red square "
                 "in the center", ""):
        assert parse_caption(text) is None, text


def test_aspect_ratio_canvases_keep_what_positions_mean(tmp_path, capsys):
    """`shards synthetic --aspect-ratios`: canvases cycle through the shapes at about R^2 area; "on the left" is
    the left quarter of every canvas, radii scale with the short side."""
    from pipeline.cli.main import main

    assert main(["shards", "synthetic", "--out", str(tmp_path), "--num-samples", "40", "--resolution", "32",
                 "--aspect-ratios", "1:1,4:3,3:4,16:9,9:16", "--format", "png"]) == 0
    samples = read_samples(tmp_path)
    sizes = {}
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        width, height = Image.open(io.BytesIO(sample["png"])).size
        assert (width, height) == (meta["width"], meta["height"])
        sizes[(width, height)] = sizes.get((width, height), 0) + 1
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int)
        for obj in (SceneObject(**o) for o in meta["objects"]):
            fx, fy = obj.cx / width, obj.cy / height
            expected = {"left": fx < 0.31, "right": fx > 0.69, "top": fy < 0.31, "bottom": fy > 0.69,
                        "center": abs(fx - 0.5) < 0.04 and abs(fy - 0.5) < 0.04}[obj.position]
            assert expected, (key, obj, width, height)
            assert 0.09 * min(width, height) <= obj.radius <= 0.23 * min(width, height)
        top = SceneObject(**meta["objects"][-1])
        assert np.abs(pixels[int(top.cy), int(top.cx)] - COLOURS[top.colour]).max() <= 12
    assert sizes == {(32, 32): 8, (37, 28): 8, (28, 37): 8, (43, 24): 8, (24, 43): 8}
    assert json.loads((tmp_path / "shards.json").read_text())["aspects"] == ["1:1", "4:3", "3:4", "16:9", "9:16"]
    assert main(["shards", "synthetic", "--out", str(tmp_path / "bad"), "--num-samples", "4",
                 "--aspect-ratios", "16-9"]) != 0
    assert "--aspect-ratios: aspect ratio '16-9' is not W:H" in capsys.readouterr().err
