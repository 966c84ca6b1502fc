"""pipeline.models.diffusers_attention: diffusers models run every attention through our dispatch, compute
what diffusers' own processors compute, and padded text tokens change nothing.

Models are tiny (<= 64 tokens per attention) so the Triton kernels stay quick in the CPU interpreter.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import pytest
import torch
from diffusers import AutoencoderKL, PriorTransformer, UNet2DConditionModel, VQModel
from diffusers.models.attention_processor import (Attention, AttnAddedKVProcessor2_0, AttnProcessor2_0,
                                                  CustomDiffusionAttnProcessor2_0)
from torch import nn

from pipeline.models.diffusers_attention import DispatchAttnProcessor, decompose_mask, install_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NEEDS_CUDA = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers has no CPU kernels (needs CUDA)")]
BACKENDS = ["sdpa", "triton", pytest.param("xformers", marks=NEEDS_CUDA)]
TOL = dict(atol=3e-5, rtol=1e-4)  # fp32; the backends differ only in summation order

Inputs = dict[str, torch.Tensor]


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """The tensors here are tiny: extra OpenMP threads only spin, and on a busy shared CPU that made this file
    three times slower (70 s -> 23 s measured on 2 shared cores). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build().to(DEVICE).eval()  # eval: no dropout anywhere


def _unet(**blocks) -> UNet2DConditionModel:
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                                encoder_hid_dim=24, **blocks)  # encoder_hid_dim: a per-token text projection


def _cross_attn_unet() -> UNet2DConditionModel:
    # For UNet2DConditionModel `attention_head_dim` is the number of heads per block (a diffusers naming quirk):
    # 1 head of 32 at the top level, 2 heads of 32 in the mid block. Attention at the top level and in the mid
    # block only, as in Stable Diffusion's layout, and few heads: the Triton interpreter is slow.
    return _unet(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(1, 2))


def _if_unet(only_cross_attention: bool = False) -> UNet2DConditionModel:
    # DeepFloyd-IF style: added-KV attention; here attention_head_dim is the head size (heads 1 and 2).
    # No addition_embed_type="text": it pools over padding tokens whatever the mask says.
    return _unet(down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
                 up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"),
                 mid_block_type="UNetMidBlock2DSimpleCrossAttn", attention_head_dim=32,
                 resnet_time_scale_shift="scale_shift", only_cross_attention=only_cross_attention)


def _unet_inputs() -> Inputs:
    gen = torch.Generator().manual_seed(1)
    # 4 x 6 latents: 24 image tokens, then 6 after the downsample; 7 text tokens, the first sample padded after 4.
    inputs = {"sample": torch.randn(2, 4, 4, 6, generator=gen), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 7, 24, generator=gen)}
    return {name: t.to(DEVICE) for name, t in inputs.items()}


def _padding_mask(batch: int, length: int, kept: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool, device=DEVICE)
    mask[0, kept:] = False
    return mask


def _unet_out(model: nn.Module, inputs: Inputs, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return model(**inputs, encoder_attention_mask=mask).sample


def _fwd_bwd(model: nn.Module, inputs: Inputs, forward: Callable[[nn.Module, Inputs], torch.Tensor]) -> dict:
    """Output, gradients of the float inputs and of every parameter, for a fixed weighted-sum loss."""
    model.zero_grad(set_to_none=True)
    leaves = {name: (t.detach().clone().requires_grad_() if t.is_floating_point() else t)
              for name, t in inputs.items()}
    out = forward(model, leaves)
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    (out * weight).sum().backward()
    grads = {f"input.{name}": t.grad for name, t in leaves.items() if t.is_floating_point()}
    grads.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return {"out": out.detach(), **grads}


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{name}: {m}")


def _ours(model: nn.Module, backend: str) -> nn.Module:
    ours = copy.deepcopy(model)
    install_attention(ours, backend)
    return ours


def _with_padded_tokens_changed(inputs: Inputs, mask: torch.Tensor) -> Inputs:
    """The same inputs with large random values in every padded text position."""
    text = inputs["encoder_hidden_states"].clone()
    noise = 10 * torch.randn(text.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    text[~mask] = noise[~mask]
    return {**inputs, "encoder_hidden_states": text}


def _with_default_reference(build: Callable[[], nn.Module]) -> tuple[nn.Module, dict]:
    """A U-Net on diffusers' own processors and its runs without and with the padding mask."""
    model, inputs, mask = _seeded(build), _unet_inputs(), _padding_mask(2, 7, kept=4)
    assert model.attn_processors and all(type(p) in (AttnProcessor2_0, AttnAddedKVProcessor2_0)
                                          for p in model.attn_processors.values())
    return model, {"plain": _fwd_bwd(model, inputs, lambda m, x: _unet_out(m, x, None)),
                   "padded": _fwd_bwd(model, inputs, lambda m, x: _unet_out(m, x, mask))}


@pytest.fixture(scope="module")
def cross_unet() -> tuple[nn.Module, dict]:
    return _with_default_reference(_cross_attn_unet)


@pytest.fixture(scope="module")
def if_unet() -> tuple[nn.Module, dict]:
    return _with_default_reference(_if_unet)


def _check_unet(model: nn.Module, reference: dict, backend: str) -> None:
    """Ours equals diffusers' default without and with padding; padded tokens change nothing, not even a bit.

    On these paths diffusers' default is exact as well: the U-Net turns encoder_attention_mask into a
    (B, 1, L) bias of -10000, and exp(-10000 + score) underflows to 0 in fp32. (Where the mask *does* leak
    in diffusers: addition_embed_type="text" pools over padding, IF pipelines never pass the mask, and
    added-KV attention with only_cross_attention=True or text as long as the image raises; see below.)
    """
    ours, inputs, mask = _ours(model, backend), _unet_inputs(), _padding_mask(2, 7, kept=4)
    _assert_same(_fwd_bwd(ours, inputs, lambda m, x: _unet_out(m, x, None)), reference["plain"])
    padded = _fwd_bwd(ours, inputs, lambda m, x: _unet_out(m, x, mask))
    _assert_same(padded, reference["padded"])
    assert torch.equal(padded["input.encoder_hidden_states"][~mask],
                       torch.zeros_like(padded["input.encoder_hidden_states"][~mask]))
    with torch.no_grad():
        changed = _unet_out(ours, _with_padded_tokens_changed(inputs, mask), mask)
    assert torch.equal(changed, padded["out"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attn_unet_equals_diffusers_default(cross_unet, backend: str) -> None:
    _check_unet(*cross_unet, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_if_unet_added_kv_equals_diffusers_default(if_unet, backend: str) -> None:
    _check_unet(*if_unet, backend)


def _per_sample_unpadded(model: nn.Module, inputs: Inputs, kept: list[int]) -> torch.Tensor:
    """Oracle for padding: each sample alone, its padded tokens cut off, no mask at all (diffusers' default)."""
    outs = []
    for i, length in enumerate(kept):
        one = {name: t[i:i + 1] for name, t in inputs.items()}
        one["encoder_hidden_states"] = one["encoder_hidden_states"][:, :length]
        outs.append(_unet_out(model, one, None))
    return torch.cat(outs)


@pytest.fixture(scope="module")
def only_cross_if_unet() -> tuple[nn.Module, dict]:
    model = _seeded(lambda: _if_unet(only_cross_attention=True), seed=2)
    return model, _fwd_bwd(model, _unet_inputs(), lambda m, x: _per_sample_unpadded(m, x, kept=[4, 7]))


def test_diffusers_only_cross_attention_mask_bug(only_cross_if_unet) -> None:
    """Documents diffusers 0.42.1: added-KV attention with only_cross_attention=True (keys = text only) fails
    with a mask, because prepare_attention_mask pads it by the image length (7 vs 7 + 24 keys). If a later
    diffusers runs it, it must agree with the per-sample oracle."""
    model, oracle = only_cross_if_unet
    with torch.no_grad():
        try:
            default = _unet_out(model, _unet_inputs(), _padding_mask(2, 7, kept=4))
        except RuntimeError as err:
            assert "must match the size" in str(err)
            return
    torch.testing.assert_close(default, oracle["out"], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_if_unet_only_cross_attention_with_mask(only_cross_if_unet, backend: str) -> None:
    """Ours masks only_cross_attention exactly: output and every gradient equal running each sample alone
    without its padded tokens, and padded tokens change nothing."""
    model, oracle = only_cross_if_unet
    ours, inputs, mask = _ours(model, backend), _unet_inputs(), _padding_mask(2, 7, kept=4)
    run = _fwd_bwd(ours, inputs, lambda m, x: _unet_out(m, x, mask))
    _assert_same(run, oracle)
    with torch.no_grad():
        changed = _unet_out(ours, _with_padded_tokens_changed(inputs, mask), mask)
    assert torch.equal(changed, run["out"])


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_added_kv_text_as_long_as_image(backend: str) -> None:
    """Text length == image tokens: diffusers' prepare_attention_mask then skips its (accidental) padding of
    the mask over the image keys and the default processor fails; ours appends "attend" for them."""
    attn = _seeded(lambda: Attention(query_dim=32, cross_attention_dim=32, heads=2, dim_head=16,
                                     added_kv_proj_dim=24, norm_num_groups=8, bias=True,
                                     processor=AttnAddedKVProcessor2_0()))
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(2, 32, 4, 4, generator=gen).to(DEVICE), torch.randn(2, 16, 24, generator=gen).to(DEVICE)
    keep = _padding_mask(2, 16, kept=9)
    bias = ((1 - keep.float()) * -10000.0)[:, None, :]  # what UNet2DConditionModel hands the processor
    with torch.no_grad():
        oracle = torch.cat([attn(image[:1], text[:1, :9]), attn(image[1:], text[1:])])  # default, no mask
        attn.set_processor(DispatchAttnProcessor(backend))
        torch.testing.assert_close(attn(image, text, attention_mask=bias), oracle, **TOL)


def _prior() -> PriorTransformer:
    return PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=32,
                            num_embeddings=8, additional_embeddings=4)


def _prior_out(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(inputs["hidden_states"], inputs["timestep"], proj_embedding=inputs["proj_embedding"],
                 encoder_hidden_states=inputs["encoder_hidden_states"],
                 attention_mask=inputs["attention_mask"]).predicted_image_embedding


@pytest.mark.parametrize("backend", BACKENDS)
def test_prior_causal_and_padding_equal_diffusers_default(backend: str) -> None:
    """The prior's self-attention gets a (B*heads, 12, 12) bias: text padding + causal, values 0/-1e4/-2e4.
    Ours decomposes it into key padding + causal=True; diffusers' default handles this mask correctly."""
    model = _seeded(_prior)
    gen = torch.Generator().manual_seed(4)
    inputs = {"hidden_states": torch.randn(2, 32, generator=gen), "timestep": torch.tensor([3, 700]),
              "proj_embedding": torch.randn(2, 32, generator=gen),
              "encoder_hidden_states": torch.randn(2, 8, 32, generator=gen)}
    inputs = {name: t.to(DEVICE) for name, t in inputs.items()}
    padded = _padding_mask(2, 8, kept=5)
    ours = _ours(model, backend)
    for mask in (padded, torch.ones_like(padded)):  # the all-kept mask is the pure causal path
        with_mask = {**inputs, "attention_mask": mask}
        _assert_same(_fwd_bwd(ours, with_mask, _prior_out), _fwd_bwd(model, with_mask, _prior_out))


def _vae_out(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    return model(inputs["sample"], sample_posterior=False).sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_autoencoder_kl_mid_attention_equals_diffusers_default(backend: str) -> None:
    """AutoencoderKL's mid-block attention: self-attention over H*W tokens with group_norm, a residual and
    4-D input, in the encoder and the decoder."""
    model = _seeded(lambda: AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4,
                                          down_block_types=("DownEncoderBlock2D",),
                                          up_block_types=("UpDecoderBlock2D",)))
    inputs = {"sample": torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE)}
    _assert_same(_fwd_bwd(_ours(model, backend), inputs, _vae_out), _fwd_bwd(model, inputs, _vae_out))


@pytest.mark.parametrize("build, expected", [(_cross_attn_unet, 8), (_if_unet, 4), (_prior, 2),
                                             (lambda: AutoencoderKL(block_out_channels=(32,), norm_num_groups=8), 2),
                                             (lambda: VQModel(block_out_channels=(32,), norm_num_groups=8), 2)])
def test_install_attention_covers_every_attention(build: Callable[[], nn.Module], expected: int) -> None:
    model = _seeded(build)
    state = copy.deepcopy(model.state_dict())
    assert install_attention(model, "triton") == expected
    processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
    assert len(processors) == expected
    assert all(isinstance(p, DispatchAttnProcessor) and p.backend == "triton" for p in processors)
    if hasattr(model, "attn_processors"):  # diffusers' own view (VQModel lacks the property)
        assert all(type(p) is DispatchAttnProcessor for p in model.attn_processors.values())
    after = model.state_dict()  # the backend is not part of the checkpoint
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_install_attention_rejects_bad_backend_and_leaves_model_alone() -> None:
    model = _seeded(_prior)
    with pytest.raises(ValueError, match="sdpa, triton, xformers"):
        install_attention(model, "flash")
    assert all(type(p) is AttnProcessor2_0 for p in model.attn_processors.values())


class _OtherAttention(nn.Module):
    """Stands for an attention class of another design (diffusers' AttentionModuleMixin family)."""

    def set_processor(self, processor: object) -> None:
        self.processor = processor

    def get_processor(self) -> object:
        return getattr(self, "processor", None)


def test_install_attention_refuses_what_it_cannot_reproduce_and_changes_nothing() -> None:
    attn = Attention(query_dim=32, heads=2, dim_head=16)
    with pytest.raises(ValueError, match=r"1 is a _OtherAttention.*only diffusers.*Attention is supported"):
        install_attention(nn.Sequential(attn, _OtherAttention()), "sdpa")
    assert type(attn.processor) is AttnProcessor2_0  # checked before anything was set
    attn.set_processor(CustomDiffusionAttnProcessor2_0(hidden_size=32, train_q_out=True))
    with pytest.raises(ValueError, match="holds trained weights"):
        install_attention(nn.Sequential(attn), "sdpa")


@pytest.mark.parametrize("norm_type", ["group", "spatial"])
def test_vq_model_equals_diffusers_default(norm_type: str) -> None:
    """VQModel's mid-block attention; norm_type="spatial" (MoVQ) adds spatial_norm fed by `temb` (the codes)."""
    model = _seeded(lambda: VQModel(block_out_channels=(32,), norm_num_groups=8, latent_channels=4,
                                    norm_type=norm_type))
    sample = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with torch.no_grad():
        want = model(sample).sample
        install_attention(model, "sdpa")
        torch.testing.assert_close(model(sample).sample, want, **TOL)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("options", ["norms_residual_rescale", "unscaled"])
def test_attention_options_equal_diffusers_default(options: str, backend: str) -> None:
    """Options no model above uses: norm_cross, qk norms, residual_connection, rescale_output_factor, biases
    (with a padding mask), and scale_qk=False, whose default processor is AttnProcessor with scale 1.0."""
    config = {"norms_residual_rescale": dict(cross_attention_norm="layer_norm", qk_norm="layer_norm",
                                             residual_connection=True, rescale_output_factor=2.0, bias=True),
              "unscaled": dict(scale_qk=False)}[options]
    attn = _seeded(lambda: Attention(query_dim=32, cross_attention_dim=32, heads=2, dim_head=16, **config))
    gen = torch.Generator().manual_seed(8)
    x, text = torch.randn(2, 5, 32, generator=gen).to(DEVICE), torch.randn(2, 6, 32, generator=gen).to(DEVICE)
    bias = ((~_padding_mask(2, 6, kept=2)).float() * -10000.0)[:, None, :]
    inputs = {"x": x, "text": text}
    run = lambda m, t: m(t["x"], t["text"], attention_mask=bias)  # noqa: E731
    want = _fwd_bwd(attn, inputs, run)
    attn.set_processor(DispatchAttnProcessor(backend))
    _assert_same(_fwd_bwd(attn, inputs, run), want)


# --- mask decomposition -------------------------------------------------------------------------------------


def test_every_diffusers_mask_layout_decomposes_to_the_same_padding() -> None:
    keep = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    bias = (1 - keep.float()) * -10000.0
    layouts = [keep, bias, bias[:, None], keep[:, None], bias.masked_fill(~keep, float("-inf"))[:, None],
               bias[:, None].repeat_interleave(3, dim=0),  # (B*heads, 1, L), as prepare_attention_mask makes
               bias[:, None, None].expand(2, 3, 4, 5),  # (B, heads, Lq, L)
               bias.to(torch.bfloat16)[:, None]]  # -10000 rounds to -9984 in bf16
    for mask in layouts:
        padding, causal = decompose_mask(mask, batch=2, heads=3, lq=4, allow_causal=True)
        assert torch.equal(padding, keep) and not causal, tuple(mask.shape)
    assert decompose_mask(torch.zeros(2, 1, 5), batch=2, heads=3, lq=4, allow_causal=True) == (None, False)


def test_prior_style_mask_decomposes_to_padding_and_causal() -> None:
    keep = torch.tensor([[True] * 5 + [False] * 3 + [True] * 4, [True] * 12])
    causal_bias = torch.full((12, 12), -10000.0).triu_(1)
    bias = ((1 - keep.float()) * -10000.0)[:, None, :] + causal_bias  # exactly PriorTransformer.forward
    padding, causal = decompose_mask(bias.repeat_interleave(2, dim=0), batch=2, heads=2, lq=12, allow_causal=True)
    assert causal and torch.equal(padding, keep)
    assert decompose_mask(causal_bias[None].expand(2, 12, 12), 2, 1, 12, allow_causal=True) == (None, True)


def _bias(keep: torch.Tensor) -> torch.Tensor:
    return (~keep).float() * -10000.0


@pytest.mark.parametrize("case", ["soft_bias", "float_keep_mask", "heads_differ", "sliding_window",
                                  "causal_not_allowed", "wrong_batch"])
def test_masks_that_are_not_padding_raise(case: str) -> None:
    """ValueError, not a silent fallback to SDPA with the full bias (see the module docstring for why)."""
    offset = torch.arange(6)[:, None] - torch.arange(6)[None, :]  # query index - key index
    causal = _bias(offset >= 0)[None].expand(2, 6, 6)
    mask, heads, allow_causal = {
        "soft_bias": (torch.randn(2, 1, 6), 1, True),  # e.g. ALiBi-like: would need the full bias
        "float_keep_mask": (torch.ones(2, 1, 6), 1, True),  # a 0/1 keep mask passed as float
        "heads_differ": (torch.zeros(4, 1, 6).index_fill_(0, torch.tensor([1, 3]), -1e4), 2, True),  # (B*heads,1,L)
        "sliding_window": (_bias((offset >= 0) & (offset <= 2))[None].expand(2, 6, 6), 1, True),
        "causal_not_allowed": (causal, 1, False),  # added-KV attention: keys are [text; image]
        "wrong_batch": (torch.zeros(3, 1, 6), 1, True),
    }[case]
    with pytest.raises(ValueError, match="DispatchAttnProcessor: attention mask"):
        decompose_mask(mask, batch=2, heads=heads, lq=6, allow_causal=allow_causal)


def test_mask_cache_sees_in_place_edits() -> None:
    """The processor remembers a mask's decomposition per tensor; editing the tensor in place must not reuse it,
    and inference-mode masks (no version counter) are not cached."""
    attn = _seeded(lambda: Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16))
    gen = torch.Generator().manual_seed(7)
    x, text = torch.randn(2, 5, 32, generator=gen).to(DEVICE), torch.randn(2, 6, 24, generator=gen).to(DEVICE)
    bias = torch.zeros(2, 1, 6, device=DEVICE)
    with torch.no_grad():
        attn.set_processor(DispatchAttnProcessor("sdpa"))
        first = attn(x, text, attention_mask=bias)
        bias[0, 0, 3:] = -10000.0
        second = attn(x, text, attention_mask=bias)
        attn.set_processor(AttnProcessor2_0())
        torch.testing.assert_close(second, attn(x, text, attention_mask=bias), **TOL)
    assert not torch.allclose(first, second)
    attn.set_processor(DispatchAttnProcessor("sdpa"))
    with torch.inference_mode():
        inference_bias = bias.clone()
        torch.testing.assert_close(attn(x, text, attention_mask=inference_bias), second, **TOL)
        inference_bias.zero_()
        torch.testing.assert_close(attn(x, text, attention_mask=inference_bias), first, **TOL)


def test_trusted_layouts_match_the_exact_decomposition():
    """The CUDA fast path (no value reads) gives the same padding/causal split as the exact check on the two mask
    layouts our models produce, and declines any other layout."""
    from pipeline.models.diffusers_attention import decompose_mask, trusted_layout

    keep = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    unet_bias = ((1 - keep.float()) * -10000.0)[:, None, :]  # what UNet2DConditionModel hands a cross-attention
    fast = trusted_layout(unet_bias, 2, 4, 9, allow_causal=False)
    exact = decompose_mask(unet_bias, 2, 4, 9, allow_causal=False)
    assert fast[1] == exact[1] is False and torch.equal(fast[0][0], exact[0][0]) and fast[0][1].all()
    heads, length = 3, 5
    causal = torch.full((length, length), -10000.0).triu(1)
    prior_bias = ((1 - keep.float()) * -10000.0)[:, None, :] + causal  # padding + causal, per sample
    prior_bias = prior_bias.repeat_interleave(heads, dim=0)
    fast = trusted_layout(prior_bias, 2, heads, length, allow_causal=True)
    exact = decompose_mask(prior_bias, 2, heads, length, allow_causal=True)
    assert fast[1] is True and exact[1] is True and torch.equal(fast[0][0], exact[0][0])
    assert trusted_layout(keep, 2, 4, 9, allow_causal=False) is None  # bool 2-D: the exact path
    assert trusted_layout(prior_bias, 2, heads, length, allow_causal=False) is None
