"""``python -m pipeline shards precompute``: aligned output shards, arrays equal to the frozen encoders' outputs,
skip markers for bad samples, parts + merge, and clear errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from data_helpers import data_config
from precompute_helpers import (BAD_IMAGE_KEY, CLIP_CONFIG, NO_CAPTION_KEY, T5_MAXLEN, precompute, read_shard,
                                stored_arrays)
from pipeline.cli.main import main
from pipeline.data.loader import build_eval_loader
from pipeline.data.precomputed_index import load_index, source_fingerprint
from pipeline.data.spec import SampleSpec, normalize_images
from pipeline.data.transforms import read_caption
from pipeline.errors import DataError
from pipeline.models.clip import ClipTokenize, preprocess_cfg, open_clip_model_cfg
from pipeline.text.t5 import FrozenT5Encoder, T5EncoderConfig


def test_output_mirrors_the_source_shards(precomputed):
    sources = sorted(precomputed.src.glob("*.tar"))
    assert [p.name for p in sorted(precomputed.pre.glob("*.tar"))] == [p.name for p in sources]
    index = json.loads((precomputed.pre / "shards.json").read_text())
    source_index = json.loads((precomputed.src / "shards.json").read_text())
    for src, entry, source_entry in zip(sources, index["shards"], index["source"]):
        src_keys = [k for k, _ in read_shard(src)]
        pre = read_shard(precomputed.pre / src.name)
        assert [k for k, _ in pre] == src_keys  # same keys, same order
        assert all(set(m) <= {f"{a}.npy" for a in index["arrays"]} | {"skip", "source_crc32"} for _, m in pre)
        assert entry == {"url": src.name, "num_samples": 9, "num_bytes": (precomputed.pre / src.name).stat().st_size,
                         "skipped": {"corrupt_image": 1, "missing_caption": 1} if src.name.endswith("1.tar") else {}}
        assert source_entry == {"name": src.name, "num_samples": 9, "num_bytes": src.stat().st_size}
    assert [s["num_samples"] for s in source_index["shards"]] == [9, 9, 9]
    assert index["source_fingerprint"] == source_fingerprint(index["source"])
    assert index["arrays"] == {
        "t5_emb": {"dtype": "float16", "shape": [T5_MAXLEN, 32], "encoder": "t5"},
        "t5_mask": {"dtype": "bool", "shape": [T5_MAXLEN], "encoder": "t5"},
        "clip_text_emb": {"dtype": "float32", "shape": [16], "encoder": "clip-text"},
        "clip_image_emb": {"dtype": "float32", "shape": [16], "encoder": "clip-image"}}
    assert [e["name"] for e in index["encoders"]] == ["t5", "clip-text", "clip-image"]
    assert index["encoders"][0]["spec"] == f"t5:{precomputed.t5}:{T5_MAXLEN}"
    assert index["num_samples"] == 27 and index["caption_key"] == "txt"


@torch.no_grad()
def test_arrays_equal_the_frozen_encoders_outputs(precomputed):
    stored = stored_arrays(precomputed.pre)
    captions = {}
    for src in sorted(precomputed.src.glob("*.tar")):
        for key, members in read_shard(src):
            if key not in (BAD_IMAGE_KEY, NO_CAPTION_KEY):
                captions[key] = read_caption(members, "txt")
    keys = sorted(captions)
    texts = [captions[k] for k in keys]
    t5 = FrozenT5Encoder(T5EncoderConfig(path=str(precomputed.t5), max_length=T5_MAXLEN)).eval()
    emb, mask = t5.encode(texts)
    got_emb = torch.from_numpy(np.stack([stored[k]["t5_emb"] for k in keys]))
    assert got_emb.dtype == torch.float16 and torch.allclose(got_emb.float(), emb, atol=2e-3, rtol=1e-3)
    assert torch.equal(torch.from_numpy(np.stack([stored[k]["t5_mask"] for k in keys])), mask)
    model = precomputed.clip_model
    text_f = model.encode_text(ClipTokenize(CLIP_CONFIG)(texts)["text"], normalize=True)
    got_text = torch.from_numpy(np.stack([stored[k]["clip_text_emb"] for k in keys]))
    assert torch.allclose(got_text, text_f, atol=1e-5)
    # Image embeddings: what a clip stage computes on the reader's evaluation batches (center crop, OpenAI norm).
    pre = preprocess_cfg(open_clip_model_cfg(CLIP_CONFIG))
    spec = SampleSpec(image_size=pre["size"], image_mean=tuple(pre["mean"]), image_std=tuple(pre["std"]))
    data = data_config((), eval_urls=str(precomputed.src), resolution=16)
    for batch in build_eval_loader(data, spec, batch_size=8, max_samples=100, rank=0, world_size=1):
        image_f = model.encode_image(normalize_images(batch["image"], spec, "cpu", torch.float32), normalize=True)
        got = torch.from_numpy(np.stack([stored[k]["clip_image_emb"] for k in batch["key"]]))
        assert torch.allclose(got, image_f, atol=1e-5)


def test_bad_samples_keep_their_place_with_a_skip_marker(precomputed):
    samples = dict(read_shard(precomputed.pre / "shard-000001.tar"))
    bad_image, no_caption = samples[BAD_IMAGE_KEY], samples[NO_CAPTION_KEY]
    assert set(bad_image) == {"t5_emb.npy", "t5_mask.npy", "clip_text_emb.npy", "skip", "source_crc32"}
    note = json.loads(bad_image["skip"])
    assert note["reason"] == "corrupt_image" and note["arrays"] == ["clip_image_emb"]
    assert set(no_caption) == {"clip_image_emb.npy", "skip", "source_crc32"}
    note = json.loads(no_caption["skip"])
    assert note["reason"] == "missing_caption" and note["arrays"] == ["clip_text_emb", "t5_emb", "t5_mask"]


def test_parts_share_the_work_and_merge(precomputed, tmp_path, capsys):
    shared = tmp_path / "shared"
    assert precompute(precomputed, precomputed.src, shared, "--num-parts", "2", "--part", "1") == 0
    assert "waiting for part(s) [0]" in capsys.readouterr().out
    assert sorted(p.name for p in shared.glob("*.tar")) == ["shard-000001.tar"]  # shard i with i % 2 == 1
    assert not (shared / "shards.json").exists()
    with pytest.raises(DataError, match=r"incomplete: part\(s\) \[0\] of 2"):
        load_index(shared)
    assert precompute(precomputed, precomputed.src, shared, "--num-parts", "2", "--part", "0") == 0
    assert "wrote" in capsys.readouterr().out and (shared / "shards.json").is_file()
    for shard in sorted(precomputed.pre.glob("*.tar")):  # the same bytes as one single run
        assert (shared / shard.name).read_bytes() == shard.read_bytes()
    merged, single = load_index(shared), load_index(precomputed.pre)
    assert merged["num_parts"] == 2 and {**merged, "num_parts": 1} == single
    # A restarted part finds its shards done; separate directories are merged by --finalize.
    assert precompute(precomputed, precomputed.src, shared, "--num-parts", "2", "--part", "0") == 0
    assert "precomputed 0 samples in 0 shards (part 0 of 2)" in capsys.readouterr().out
    apart = tmp_path / "apart"
    assert precompute(precomputed, precomputed.src, apart, "--num-parts", "2", "--part", "0") == 0
    for name in ("shard-000001.tar", "shards.part-1.json"):
        shutil.copy(shared / name, apart / name)
    assert main(["shards", "precompute", "--finalize", "--out", str(apart)]) == 0
    assert load_index(apart) == merged


def test_parts_with_other_settings_do_not_merge(precomputed, tmp_path, capsys):
    out = tmp_path / "out"
    assert precompute(precomputed, precomputed.src, out, "--num-parts", "2", "--part", "0",
                      arrays=("t5_emb",)) == 0
    assert precompute(precomputed, precomputed.src, out, "--num-parts", "2", "--part", "1",
                      arrays=("clip_text_emb",)) == 1
    assert "different arrays, encoders" in capsys.readouterr().err
    assert not (out / "shards.json").exists()
    # Re-running a part with other encoders into the same directory is refused too.
    assert precompute(precomputed, precomputed.src, out, "--num-parts", "2", "--part", "0",
                      arrays=("clip_text_emb",)) == 1
    assert "write to a new --out directory" in capsys.readouterr().err


def test_usage_and_source_errors(precomputed, tmp_path, capsys):
    assert main(["shards", "precompute", str(precomputed.src), "--out", str(tmp_path / "o"),
                 "--encoder", "vae:x"]) == 2
    assert "unknown encoder 'vae'; valid: clip-image, clip-text, latents, t5" in capsys.readouterr().err
    assert main(["shards", "precompute", str(precomputed.src), "--out", str(tmp_path / "o")]) == 2
    assert precompute(precomputed, precomputed.src, precomputed.src, arrays=("t5_emb",)) == 2
    assert "would overwrite them" in capsys.readouterr().err
    assert main(["shards", "precompute", str(precomputed.src), "--out", str(tmp_path / "o"), "--encoder",
                 f"clip-text:{tmp_path}"]) == 2
    assert "no open_clip_config.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(precomputed.src, broken)
    shard = broken / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])  # truncated inside a sample
    assert precompute(precomputed, broken, tmp_path / "o2", arrays=("t5_emb",)) == 1
    err = capsys.readouterr().err
    assert "shard-000002.tar cannot be read completely" in err and "leave it out of SRC" in err
    assert not (tmp_path / "o2" / "shard-000002.tar").exists()  # no partial output under the final name
    assert not list((tmp_path / "o2").glob("*.tmp"))
