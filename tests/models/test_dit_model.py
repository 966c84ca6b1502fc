"""The DiT backbone: diffusers' PixArtTransformer2DModel built from DiTConfig, our attention processors on every
attention, the T5 padding mask at every cross-attention, per-block checkpointing, and an exported folder that the
stock diffusers class loads and that reproduces our outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.models.dit import DiTConfig, build_dit
from pipeline.models.diffusers_attention import DispatchAttnProcessor, install_attention
from pipeline.models.unet import Conditioning, unet_forward
from pipeline.stages.unet import UNetStage
from pipeline.train.stage import StageContext

REPO = Path(__file__).resolve().parents[2]
CTX = StageContext(rank=0, world_size=1, device=torch.device("cpu"), compute_dtype=torch.float32)
TINY = DiTConfig(patch_size=2, depth=2, width=48, heads=2)


def tiny_dit(super_res: bool = False, seed: int = 0) -> tuple[torch.nn.Module, Conditioning]:
    torch.manual_seed(seed)
    cond = Conditioning(24, pooled_text=False, level_dim=8 if super_res else 0,
                        low_res_channels=3 if super_res else 0, backbone="dit")
    dit = build_dit(TINY, sample_size=8, in_channels=3, out_channels=3, text_dim=24,
                    low_res_channels=cond.low_res_channels, level_conditioned=super_res).eval()
    # PixArt initialises its output projection and adaLN tables so that the first steps are near zero; perturb
    # every parameter so the tests below compare outputs that depend on every input
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit, cond


def inputs(batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2:] = False
    text = torch.randn(batch, 9, 24, generator=gen) * mask[..., None]
    return {"text": text, "mask": mask, "low_res": torch.randn(batch, 3, 8, 8, generator=gen),
            "level": torch.tensor([0.1, 0.7, 0.3])[:batch]}


@pytest.mark.parametrize("super_res", [False, True], ids=["base", "super_res"])
def test_padded_token_embeddings_change_nothing_and_every_attention_is_ours(super_res):
    dit, cond = tiny_dit(super_res)
    assert install_attention(dit, "sdpa") == 2 * TINY.depth  # self- and cross-attention of every block
    processors = [m.get_processor() for m in dit.modules() if hasattr(m, "get_processor")]
    assert all(isinstance(p, DispatchAttnProcessor) for p in processors)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10.0, 500.0, 999.0])
    base = inputs(3, seed=1)
    garbage = dict(base, text=torch.where(base["mask"][..., None], base["text"], 50 * torch.randn_like(base["text"])))
    with torch.no_grad():
        a = unet_forward(dit, cond, x, t, base)
        b = unet_forward(dit, cond, x, t, garbage)
        c = unet_forward(dit, cond, x, t, dict(base, text=base["text"].flip(0), mask=base["mask"].flip(0)))
    assert a.shape == (3, 3, 8, 8)
    assert torch.equal(a, b)  # exactly: padded positions never reach the output
    assert not torch.allclose(a, c)  # while the real tokens do matter
    if super_res:  # the noise-augmentation level reaches the network
        with torch.no_grad():
            d = unet_forward(dit, cond, x, t, dict(base, level=torch.tensor([0.9, 0.0, 0.5])))
        assert not torch.allclose(a, d)


def test_stock_diffusers_without_a_mask_differs_so_the_mask_test_can_fail():
    """diffusers' own processors with the mask dropped do see the padding: the invariance above is the mask's."""
    dit, cond = tiny_dit()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([10.0, 500.0, 999.0])
    base = inputs(3, seed=1)
    garbage = torch.where(base["mask"][..., None], base["text"], 50 * torch.randn_like(base["text"]))
    with torch.no_grad():
        a = dit(x, encoder_hidden_states=base["text"], timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        b = dit(x, encoder_hidden_states=garbage, timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("super_res", [False, True], ids=["base", "super_res"])
def test_exported_folder_loads_in_stock_diffusers_and_reproduces_our_outputs(super_res, tmp_path):
    from diffusers import PixArtTransformer2DModel

    dit, cond = tiny_dit(super_res)
    install_attention(dit, "sdpa")
    dit.save_pretrained(str(tmp_path / "dit"), safe_serialization=True)
    stock = PixArtTransformer2DModel.from_pretrained(str(tmp_path / "dit")).eval()  # diffusers' own processors
    x, t = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([10.0, 500.0, 999.0])
    data = inputs(3, seed=2)
    with torch.no_grad():
        ours = unet_forward(dit.double(), cond, x, t, {k: (v.double() if v.is_floating_point() else v)
                                                       for k, v in data.items()})
        sample = torch.cat([x, data["low_res"].double()], 1) if super_res else x
        added = {"resolution": None, "aspect_ratio": None}
        if super_res:
            added = {"resolution": torch.tensor([[8.0, 8.0]] * 3), "aspect_ratio": data["level"][:, None] * 1000}
        theirs = stock.double()(sample, encoder_hidden_states=data["text"].double(), timestep=t,
                                added_cond_kwargs=added, encoder_attention_mask=data["mask"]).sample
    # fp64 on both sides; the only difference is the softmax of masked keys (exactly 0 for us, exp(-10000) for
    # diffusers, also 0 in fp64) and summation order
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_activation_checkpointing_gives_the_same_gradients():
    dit, cond = tiny_dit()
    dit.train()
    install_attention(dit, "sdpa")
    x, t, data = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0]), inputs(2, seed=3)

    def grads() -> list[torch.Tensor]:
        dit.zero_grad()
        unet_forward(dit, cond, x, t, data).square().mean().backward()
        return [p.grad.clone() for p in dit.parameters()]

    plain = grads()
    dit.enable_gradient_checkpointing()
    assert dit.gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["dit_latent256_flow", "dit_latent512_flow"])
def test_real_dit_configs_build_on_the_meta_device(name, capsys, tmp_path):
    # the KL-f8 autoencoder's geometry, read from its exported config.json as the stage reads it (no weights)
    (tmp_path / "config.json").write_text(json.dumps({"latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
                                                      "sample_size": 256}))
    cfg = load_config(REPO / "configs" / "unet" / f"{name}.yaml", [f"model.autoencoder={tmp_path}"])
    stage = UNetStage(cfg, CTX)
    with torch.device("meta"):
        dit = stage.build_trainable()["unet"]
    params = sum(p.numel() for p in dit.parameters())
    tokens = (dit.config.sample_size // dit.config.patch_size) ** 2
    with capsys.disabled():
        print(f"\n{name}: {params / 1e6:.1f} M parameters, {cfg.data.resolution} px, {tokens} tokens, "
              f"flow shift {stage.schedule.shift:.3f}, T5 width {dit.config.caption_channels}")
    assert type(dit).__name__ == "PixArtTransformer2DModel" and dit.config.caption_channels == 4096
    assert dit.config.in_channels == 4 and tokens == (cfg.data.resolution // 16) ** 2
    assert 550e6 < params < 650e6  # PixArt-alpha XL/2: ~610 M


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.dit.heads"):
        DiTConfig(width=96, heads=5)
    with pytest.raises(ConfigError, match="model.dit.patch_size"):
        DiTConfig(patch_size=0)


def test_triton_backend_gives_the_sdpa_outputs_with_the_padding_mask():
    """The Triton flash-attention kernel (interpreted on CPU) on every DiT attention, masks included."""
    torch.manual_seed(0)
    cond = Conditioning(24, pooled_text=False, backbone="dit")
    dit = build_dit(DiTConfig(patch_size=2, depth=2, width=64, heads=2), sample_size=8, in_channels=3,
                    out_channels=3, text_dim=24).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, data = torch.randn(3, 3, 8, 8), torch.tensor([10.0, 500.0, 999.0]), inputs(3, seed=4)
    outs = {}
    for backend in ("sdpa", "triton"):
        install_attention(dit, backend)
        with torch.no_grad():
            outs[backend] = unet_forward(dit, cond, x, t, data)
    torch.testing.assert_close(outs["triton"], outs["sdpa"], rtol=0, atol=1e-5)  # fp32 kernels, reordered sums
