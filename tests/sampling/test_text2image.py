"""Export a tiny two-stage pixel cascade into one bundle and sample it from Python and the command line: every
component loads in its own library, image i does not depend on --num-images, and bad bundles or arguments fail
with one line and the right exit code."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.bundle import BUNDLE_JSON, describe_files
from pipeline.cli.main import main
from pipeline.export import export_run
from pipeline.sampling.text2image import Text2Image
from train_helpers import train_inprocess
from unet_helpers import unet_config

PROMPT = "a large red circle on the left"


@pytest.fixture(scope="module")
def bundle(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    base = unet_config(shards, data={"resolution": 8}, model={"unet": {"channels": 16, "channel_mult": [1, 2],
                                                                       "attention_resolutions": [4], "head_width": 8,
                                                                       "norm_groups": 8}},
                       train={"max_steps": 2, "sample_every": 0}, eval={"every_steps": 0})
    sr = unet_config(shards, super_res=True, train={"max_steps": 2, "sample_every": 0}, eval={"every_steps": 0})
    for name, raw in (("base", base), ("sr", sr)):
        assert train_inprocess(raw, root / name) == 0
        export_run(root / name, root / "bundle")
    return root / "bundle"


def test_index_lists_cascade_files_and_each_component_loads_in_its_library(bundle):
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, T5EncoderModel

    index = json.loads((bundle / BUNDLE_JSON).read_text())
    assert index["cascade"] == ["unet_base", "unet_sr16"] and set(index["components"]) == {"unet_base", "unet_sr16",
                                                                                           "t5"}
    entry = index["components"]["unet_sr16"]
    assert entry["low_res"] == 8 and entry["resolution"] == 16 and entry["sampling"]["guidance"] == 3.0
    assert entry["files"] == describe_files(bundle / "unet_sr16")
    t2i = Text2Image.from_bundle(bundle)
    ours = t2i.levels[0].unet
    theirs = UNet2DConditionModel.from_pretrained(str(bundle / "unet_base")).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([500])
    text, mask = t2i._encode_text([PROMPT], t2i.levels[0])
    labels = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, text, class_labels=labels, encoder_attention_mask=mask).sample,
                                   ours(x, t, text, class_labels=labels, encoder_attention_mask=mask).sample)
    t5 = T5EncoderModel.from_pretrained(str(bundle / "t5")).eval()
    ids = AutoTokenizer.from_pretrained(str(bundle / "t5"))([PROMPT], return_tensors="pt")
    with torch.no_grad():
        hidden = t5(input_ids=ids["input_ids"]).last_hidden_state
    torch.testing.assert_close(hidden[0], text[0, :hidden.shape[1]])


def test_sampling_is_seeded_and_image_i_does_not_depend_on_the_number_drawn(bundle):
    t2i = Text2Image.from_bundle(bundle)
    four = t2i.generate(PROMPT, num_images=4, seed=3, steps=4)
    assert four.shape == (4, 3, 16, 16)
    one = t2i.generate(PROMPT, num_images=1, seed=3, steps=4)
    torch.testing.assert_close(one[0], four[0], atol=1e-5, rtol=0)
    assert not torch.allclose(four[0], four[1])
    images = t2i([PROMPT, "a small blue square at the top"], num_images=2, seed=3, steps=4)
    assert len(images) == 4 and images[0].size == (16, 16)
    edited = t2i.generate(PROMPT, init_image=images[3], strength=0.5, steps=4)
    assert edited.shape == (1, 3, 16, 16)


def test_cli_writes_a_grid_and_one_png_per_image(bundle, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", str(bundle), "--prompt", PROMPT, "--out", str(out), "--num-images", "3", "--steps", "4",
                 "--sampler", "ddim", "--guidance", "2", "--out-dir", str(tmp_path / "each"), "--seed", "5"])
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and sorted(p.name for p in (tmp_path / "each").iterdir()) == [
        "grid_000.png", "grid_001.png", "grid_002.png"]


@pytest.mark.parametrize("args, code, message", [
    (["--prompt", "  "], 2, "the prompt is empty"),
    (["--guidance", "0.5"], 2, "--guidance must be >= 1"),
    (["--steps", "0"], 2, "--steps must be between 1 and 1000"),
    (["--sampler", "plms"], 2, "model.sampling.sampler.name must be one of ddpm, ddim, dpmpp_2m, euler, heun"),
    (["--image", "nowhere.png"], 2, "not conditioned on CLIP image embeddings"),
])
def test_bad_arguments_exit_2_with_one_line(bundle, tmp_path, capsys, args, code, message):
    argv = ["sample", str(bundle), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"), *args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def _copy(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle, tmp_path / "copy")


def test_damaged_bundles_fail_with_one_line_and_exit_1(bundle, tmp_path, capsys):
    def run(path):
        assert main(["sample", str(path), "--prompt", PROMPT, "--out", str(tmp_path / "x.png")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    copy = _copy(bundle, tmp_path)
    weights = copy / "unet_sr16" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "'unet_sr16' is damaged" in run(copy) and "sha256 mismatch" in run(copy)
    weights.unlink()
    assert "missing" in run(copy)

    copy2 = _copy(bundle, tmp_path / "b")
    index = json.loads((copy2 / BUNDLE_JSON).read_text())
    del index["components"]["unet_base"]
    (copy2 / BUNDLE_JSON).write_text(json.dumps(index))
    assert "no base U-Net stage" in run(copy2)

    copy3 = _copy(bundle, tmp_path / "c")  # a config that does not match its weights (re-indexed, so it verifies)
    config = json.loads((copy3 / "unet_base" / "config.json").read_text())
    config["layers_per_block"] = 2
    (copy3 / "unet_base" / "config.json").write_text(json.dumps(config))
    index = json.loads((copy3 / BUNDLE_JSON).read_text())
    index["components"]["unet_base"]["files"] = describe_files(copy3 / "unet_base")
    (copy3 / BUNDLE_JSON).write_text(json.dumps(index))
    assert "weights do not match the model" in run(copy3)
    assert "not an export bundle" in run(tmp_path)


def test_concurrent_exports_into_one_bundle_keep_every_component(bundle, tmp_path, monkeypatch):
    """Two runs exported into one bundle at the same time (the demo's two training chains do this): each export
    holds the bundle's lock, so neither drops the other's component from bundle.json nor rewrites the shared t5/
    folder under the other. Hashing is slowed so that, without the lock, both read the index before either writes."""
    import threading
    import time

    import pipeline.bundle as bundle_module
    from pipeline.bundle import Bundle

    hash_files = bundle_module.describe_files

    def slow_describe(folder):
        time.sleep(0.3)
        return hash_files(folder)

    monkeypatch.setattr(bundle_module, "describe_files", slow_describe)
    out, errors = tmp_path / "together", []

    def export(name):
        try:
            export_run(bundle.parent / name, out)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=export, args=(name,)) for name in ("base", "sr")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert set(Bundle.open(out).components) == {"unet_base", "unet_sr16", "t5"}
