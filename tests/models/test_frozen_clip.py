"""pipeline.models.frozen_clip: the frozen CLIP the prior uses computes exactly what open_clip computes, per token
and pooled, for CLIP and CustomTextCLIP folders; padding positions follow open_clip's causal structure."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from pipeline.errors import ConfigError
from pipeline.models.frozen_clip import FrozenClip, read_clip_info
from prior_helpers import TINY_CLIP, export_tiny_clip

CAPTIONS = ["a small red circle", "a large blue square on the left and a tiny green triangle at the top right corner"]


def _write_folder(out: Path, custom_text: bool, pool_type: str) -> Path:
    """An open_clip folder written by hand (config + safetensors), for tower variants our clip stage never builds."""
    vision = dict(TINY_CLIP["vision"])
    text = {**TINY_CLIP["text"], "pool_type": pool_type, "eos_id": 49407}
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    torch.manual_seed(3)
    model = cls(embed_dim=TINY_CLIP["embed_dim"], vision_cfg=vision, text_cfg=text)
    with torch.no_grad():  # move every weight away from init (open_clip zero-inits some) so nothing passes trivially
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out.mkdir(parents=True)
    model_cfg = {"embed_dim": TINY_CLIP["embed_dim"], "vision_cfg": vision, "text_cfg": text}
    if custom_text:
        model_cfg["custom_text"] = True
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frozen_clip")
    return {"exported": export_tiny_clip(root / "exported", seed=1),
            "custom_text": _write_folder(root / "custom_text", True, "argmax"),
            "eos_pool": _write_folder(root / "eos_pool", False, "eos")}


@pytest.mark.parametrize("variant", ["exported", "custom_text", "eos_pool"])
def test_encodings_equal_open_clip(folders, variant):
    folder = folders[variant]
    ours = FrozenClip.load(folder)
    theirs = open_clip.create_model(f"local-dir:{folder}").eval()
    assert isinstance(theirs, open_clip.CustomTextCLIP) == (variant == "custom_text")
    ids = open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS)
    assert torch.equal(ours.tokenize(CAPTIONS)["text"], ids)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    enc = ours.encode_text(ids)
    with torch.no_grad():
        # Two code paths (ours runs the text tower token by token for the prior): equal to fp32 rounding, not bit
        # for bit (they are on a Xeon, 2e-7 apart on an AMD EPYC, whose kernels split reductions differently)
        torch.testing.assert_close(enc.pooled, theirs.encode_text(ids, normalize=True), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=1e-5)
        unnormalised = theirs.encode_text(ids)
    assert enc.tokens.shape == (2, 16, TINY_CLIP["text"]["width"])  # (B, L, W), W != E
    eot = ids.argmax(dim=-1)
    assert eot.tolist() == [5, 15]  # the second caption is truncated: EOT in the last position
    assert enc.mask.tolist() == [[i <= 5 for i in range(16)], [True] * 16]
    # the EOT token's projected encoding is open_clip's (unnormalised) text embedding
    projected = ours.project_tokens(enc.tokens)
    assert projected.shape == (2, 16, TINY_CLIP["embed_dim"])
    torch.testing.assert_close(projected[torch.arange(2), eot], unnormalised, atol=1e-5, rtol=1e-5)


def test_padding_positions_do_not_change_real_tokens(folders):
    """open_clip's text tower is causal: whatever sits after the EOT leaves every real token's encoding alone."""
    clip = FrozenClip.load(folders["exported"])
    ids = clip.tokenize(CAPTIONS[:1])["text"]
    other = ids.clone()
    other[0, 6:] = torch.randint(1, 49000, (10,), generator=torch.Generator().manual_seed(0))  # ids below EOT's
    a, b = clip.encode_text(ids), clip.encode_text(other)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)
    assert torch.equal(a.tokens[:, :6], b.tokens[:, :6])
    assert not torch.allclose(a.tokens[:, 6:], b.tokens[:, 6:])  # the padded positions themselves do change


def test_info_tokenizer_pickle_and_errors(folders, tmp_path):
    info = read_clip_info(folders["exported"])
    assert (info.embed_dim, info.token_width, info.context_length, info.image_size) == (16, 32, 16, 16)
    tokenize = pickle.loads(pickle.dumps(FrozenClip.load(folders["exported"]).tokenize))  # into loader workers
    assert tokenize(["a red circle"])["text"].shape == (1, 16)
    with pytest.raises(ConfigError, match="model.clip: .*nowhere does not exist"):
        read_clip_info(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no open_clip_config.json"):
        read_clip_info(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "open_clip_config.json").write_text(
        (folders["exported"] / "open_clip_config.json").read_text())
    with pytest.raises(ConfigError, match="no CLIP weights"):
        FrozenClip.load(tmp_path / "noweights")
