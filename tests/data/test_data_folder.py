"""``python -m pipeline shards from-folder``: packing an img2dataset-style folder, unusable files counted."""
from __future__ import annotations

import io
import json

from PIL import Image

from data_helpers import SPEC, data_config, jpeg_bytes
from pipeline.cli.main import main
from pipeline.data.loader import build_eval_loader


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 200, 30, 255)).save(buf, "PNG")
    return buf.getvalue()


def _make_folder(root):
    (root / "00000").mkdir(parents=True)
    (root / "00001" / "deep").mkdir(parents=True)
    good = {
        "00000/000000001": ("jpg", jpeg_bytes(20, 16, 1)),
        "00000/000000002": ("png", _png(16, 20)),
        "00001/deep/000000003": ("jpeg", jpeg_bytes(18, 18, 3)),
        "00001/a.b": ("jpg", jpeg_bytes(16, 16, 4)),   # a '.' in the stem ...
        "00001/a_b": ("JPG", jpeg_bytes(16, 16, 5)),   # ... and a stem that sanitises to the same key
    }
    for stem, (ext, data) in good.items():
        (root / f"{stem}.{ext}").write_bytes(data)
        (root / f"{stem}.txt").write_text(f"caption of {stem}\n")
    (root / "00000/000000001.json").write_text(json.dumps({"url": "x", "caption": "json caption"}))
    bad_files = {
        "00000/nocap.jpg": jpeg_bytes(16, 16, 9),                                     # missing_caption
        "00000/noimg.txt": b"orphan caption",                                         # missing_image
        "00000/broken.jpg": b"\xff\xd8garbage", "00000/broken.txt": b"x",             # corrupt_image
        "00000/zero.png": b"", "00000/zero.txt": b"x",                                # empty_image
        "00000/blank.jpg": jpeg_bytes(16, 16, 10), "00000/blank.txt": b" \n",          # empty_caption
        "00000/latin.jpg": jpeg_bytes(16, 16, 11), "00000/latin.txt": "\u00e9t\u00e9".encode("latin-1"),
        "00000/badjson.jpg": jpeg_bytes(16, 16, 12), "00000/badjson.txt": b"ok", "00000/badjson.json": b"{",
        "00000/000000002.webp": b"second image for the same stem",                    # duplicate_image
        "00000/notes.parquet": b"PAR1", "00000/.DS_Store": b"\0",                      # unknown_extension x2
        "00000/trunc.jpg": jpeg_bytes(64, 64, 13)[:200], "00000/trunc.txt": b"cut",   # corrupt_image
    }
    for name, data in bad_files.items():
        (root / name).write_bytes(data)


def test_from_folder_packs_usable_samples_and_counts_the_rest(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _make_folder(src)
    assert main(["shards", "from-folder", str(src), "--out", str(out), "--shard-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 samples in 3 shards" in printed
    expected = {"bad_caption_encoding": 1, "bad_json": 1, "corrupt_image": 2, "duplicate_image": 1,
                "empty_caption": 1, "empty_image": 1, "missing_caption": 1, "missing_image": 1,
                "unknown_extension": 2}
    for reason, count in expected.items():
        assert f"{reason}={count}" in printed
    index = json.loads((out / "shards.json").read_text())
    assert index["skipped"] == expected and index["num_samples"] == 5 and index["generator"] == "from-folder"

    data = data_config((), eval_urls=str(out))
    batches = list(build_eval_loader(data, SPEC, batch_size=8, max_samples=100, rank=0, world_size=1))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == ["00000_000000001", "00000_000000002", "00001_a_b", "00001_a_b_1",
                            "00001_deep_000000003"]
    assert all("." not in k for k in keys)
    captions = dict(zip(keys, batches[0]["caption"]))
    assert captions["00001_deep_000000003"] == "caption of 00001/deep/000000003"
    json_caption = data_config((), eval_urls=str(out), caption_key="json:caption")
    only_json = list(build_eval_loader(json_caption, SPEC, batch_size=8, max_samples=100, rank=0, world_size=1))
    assert only_json[0]["caption"] == ["json caption"]  # the other samples have no .json: skipped


def test_from_folder_is_byte_identical_on_rerun(tmp_path, capsys):
    src = tmp_path / "src"
    _make_folder(src)
    for name in ("a", "b"):
        assert main(["shards", "from-folder", str(src), "--out", str(tmp_path / name), "--max-shard-bytes", "900"]) == 0
    shards_a = sorted((tmp_path / "a").glob("*.tar"))
    assert len(shards_a) >= 3  # the byte limit rolled over
    assert [p.read_bytes() for p in shards_a] == [p.read_bytes() for p in sorted((tmp_path / "b").glob("*.tar"))]


def test_from_folder_without_usable_samples_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt").write_text("caption without image")
    assert main(["shards", "from-folder", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no usable samples") and "missing_image=1" in err
    assert main(["shards", "from-folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
