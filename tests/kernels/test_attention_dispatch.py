"""pipeline.models.attention: the backends compute the same function; bad names fail clearly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models.attention import ATTENTION_BACKENDS, GroupNormSiLU, attend, check_backend, xformers_bias


def _qkv(b: int, h: int, lq: int, lk: int, d: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d))]


def _fwd_bwd(backend: str, q, k, v, **kwargs) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves, backend=backend, **kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return [out, *(t.grad for t in leaves)]


@pytest.mark.parametrize("causal, lk", [(False, 21), (True, 40)])
def test_sdpa_and_triton_agree(causal: bool, lk: int) -> None:
    q, k, v = _qkv(3, 2, 40, lk, 32, seed=lk)
    mask = torch.ones(3, lk, dtype=torch.bool)
    mask[0, lk // 2:] = False
    mask[1] = False  # a fully padded sample: zeros, no NaN, on both backends
    mask[2, :3] = False  # leading padding: with causal, the first rows see no key
    sdpa = _fwd_bwd("sdpa", q, k, v, key_padding_mask=mask, causal=causal)
    triton = _fwd_bwd("triton", q, k, v, key_padding_mask=mask, causal=causal)
    for a, b in zip(sdpa, triton):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    assert torch.equal(sdpa[0][1], torch.zeros_like(sdpa[0][1]))


def test_sdpa_without_mask_matches_triton() -> None:
    q, k, v = _qkv(1, 2, 24, 24, 16, seed=3)
    for causal in (False, True):
        torch.testing.assert_close(attend(q, k, v, causal=causal, backend="triton"),
                                   attend(q, k, v, causal=causal, backend="sdpa"), atol=2e-5, rtol=1e-4)


def test_invalid_backend_lists_valid_names() -> None:
    q, k, v = _qkv(1, 1, 4, 4, 16, seed=0)
    with pytest.raises(ValueError, match="sdpa, triton, xformers"):
        attend(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        GroupNormSiLU(8, 4, backend="cudnn")
    assert [check_backend(name) for name in ATTENTION_BACKENDS] == list(ATTENTION_BACKENDS)


def test_causal_needs_equal_lengths_on_every_backend() -> None:
    q, k, v = _qkv(1, 1, 4, 6, 16, seed=0)
    for backend in ATTENTION_BACKENDS:
        with pytest.raises(ValueError, match="causal"):
            attend(q, k, v, causal=True, backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_xformers_on_cpu_raises_clearly() -> None:
    q, k, v = _qkv(1, 1, 4, 4, 16, seed=0)
    with pytest.raises(RuntimeError, match="xformers.*CUDA"):
        attend(q, k, v, backend="xformers")


@pytest.mark.parametrize("causal", [False, True])
def test_xformers_bias_is_aligned_and_equivalent(causal: bool) -> None:
    """The bias handed to xformers (whose kernels need CUDA) has its layout rules and the sdpa semantics."""
    q, k, v = _qkv(2, 3, 13, 13, 16, seed=4)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, :4] = False
    keep = mask[:, None, None, :] & (torch.ones(13, 13, dtype=torch.bool).tril() if causal else True)
    has_key = keep.any(-1, keepdim=True)
    bias = xformers_bias((keep | ~has_key).expand(2, 1, keep.shape[2], 13), 3, 13, q)
    assert bias.shape == (2, 3, 13, 13) and bias.stride(-1) == 1
    assert all(stride % 8 == 0 for stride in bias.stride()[:-1])
    scores = q @ k.transpose(-1, -2) * 16 ** -0.5 + bias  # xformers' documented reference semantics
    got = (scores.softmax(-1) @ v) * has_key
    torch.testing.assert_close(got, attend(q, k, v, key_padding_mask=mask, causal=causal), atol=1e-5, rtol=1e-5)


def test_group_norm_silu_module_backends_agree_and_share_state() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 5, 5, generator=gen)
    scale, shift = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)
    ref_mod = GroupNormSiLU(8, num_groups=4, backend="sdpa")
    with torch.no_grad():
        ref_mod.weight.copy_(torch.randn(8, generator=gen))
        ref_mod.bias.copy_(torch.randn(8, generator=gen))
    tri_mod = GroupNormSiLU(8, num_groups=4, backend="triton")
    tri_mod.load_state_dict(ref_mod.state_dict())
    outs = []
    for mod in (ref_mod, tri_mod):
        xi = x.clone().requires_grad_()
        y = mod(xi, scale=scale, shift=shift)
        y.square().sum().backward()
        outs.append([y, xi.grad, mod.weight.grad, mod.bias.grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    plain = nn.GroupNorm(4, 8)
    plain.load_state_dict(ref_mod.state_dict())  # checkpoints stay loadable into nn.GroupNorm
    no_silu = GroupNormSiLU(8, num_groups=4, apply_silu=False)
    no_silu.load_state_dict(ref_mod.state_dict())
    torch.testing.assert_close(no_silu(x), plain(x))
