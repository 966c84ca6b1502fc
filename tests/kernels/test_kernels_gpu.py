"""Kernels at realistic sizes on a CUDA device (skipped without one).

bf16 results are judged against an fp32 computation: our error must stay within a small factor of
the error PyTorch's own bf16 path makes on the same inputs.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from pipeline.models.attention import attend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item()


def _attn_grads(fn, q, k, v, grad_out, **kwargs) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    out.backward(grad_out)
    return [out, *(t.grad for t in leaves)]


def _sdpa(q, k, v, key_padding_mask=None, causal=False):
    """PyTorch's own bf16 attention (flash without a mask, efficient/math with one)."""
    return attend(q, k, v, key_padding_mask=key_padding_mask, causal=causal, backend="sdpa")


@pytest.mark.parametrize("b, h, lq, lk, d, causal, masked", [
    (2, 8, 4096, 4096, 64, False, False),
    (4, 8, 1024, 1024, 64, False, False),
    (2, 8, 4096, 77, 64, False, True),
    (2, 8, 4096, 256, 64, False, True),
    (8, 8, 256, 256, 64, True, False),
    (2, 8, 1024, 1024, 128, False, False),
    (2, 8, 1024, 77, 40, False, True),
    (2, 4, 512, 512, 80, True, False),
])
def test_attention_bf16_vs_fp32(b, h, lq, lk, d, causal, masked) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = [torch.randn(s, device="cuda", generator=gen) for s in
                         ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d), (b, h, lq, d))]
    mask = None
    if masked:
        lengths = torch.randint(1, lk + 1, (b,), device="cuda", generator=gen)
        mask = torch.arange(lk, device="cuda")[None, :] < lengths[:, None]
    kw = dict(key_padding_mask=mask, causal=causal)
    want = _attn_grads(reference.attention, q, k, v, grad_out, **kw)
    as_bf16 = [t.bfloat16() for t in (q, k, v, grad_out)]
    ours = _attn_grads(kernels.attention, *as_bf16, **kw)
    torch_bf16 = _attn_grads(_sdpa, *as_bf16, **kw)
    for name, o, t, w in zip(["out", "dq", "dk", "dv"], ours, torch_bf16, want):
        assert torch.isfinite(o).all(), name
        assert _err(o, w) <= 2.0 * _err(t, w) + 1e-3, f"{name}: ours {_err(o, w):.3e} torch {_err(t, w):.3e}"


def test_attention_fp32_and_fp16_small() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, grad_out = [torch.randn(s, device="cuda", generator=gen) for s in
                         ((2, 4, 300, 64), (2, 4, 200, 64), (2, 4, 200, 64), (2, 4, 300, 64))]
    want = _attn_grads(reference.attention, *(t.double() for t in (q, k, v)), grad_out.double())
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
        got = _attn_grads(kernels.attention, *(t.to(dtype) for t in (q, k, v)), grad_out.to(dtype))
        for o, w in zip(got, want):
            assert _err(o, w) / w.abs().max().item() < tol


@pytest.mark.parametrize("shape, groups", [((8, 320, 64, 64), 32), ((4, 640, 32, 32), 32), ((2, 128, 256, 256), 32)])
def test_group_norm_silu_bf16(shape: tuple, groups: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    b, c = shape[:2]
    x = torch.randn(shape, device="cuda", generator=gen)
    w, bias = torch.randn(c, device="cuda", generator=gen), torch.randn(c, device="cuda", generator=gen)
    scale, shift = torch.randn(b, c, device="cuda", generator=gen), torch.randn(b, c, device="cuda", generator=gen)
    want = reference.group_norm_silu(x, w, bias, groups, scale=scale, shift=shift)
    got = kernels.group_norm_silu(x.bfloat16(), w, bias, groups, scale=scale.bfloat16(), shift=shift.bfloat16())
    torch_bf16 = reference.group_norm_silu(x.bfloat16(), w, bias, groups, scale=scale.bfloat16(),
                                           shift=shift.bfloat16())
    assert _err(got, want) <= 2.0 * _err(torch_bf16, want) + 1e-2
