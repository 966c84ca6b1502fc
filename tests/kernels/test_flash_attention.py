"""Flash-attention kernel (through the Triton interpreter on CPU) against a float64 oracle."""
from __future__ import annotations

import itertools
import math
from typing import Optional

import pytest
import torch

import kernels
from kernels import flash_bwd, flash_fwd, reference

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # max error / max |reference|


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], causal: bool,
           scale: float) -> torch.Tensor:
    """Explicit float64 softmax attention; rows with no visible key are 0."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    keep = torch.ones_like(scores, dtype=torch.bool)
    if causal:
        keep = keep & torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    has_key = keep.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~(keep | ~has_key), -math.inf), dim=-1) * has_key
    return probs @ v.double()


def make_inputs(shape_q: tuple, lk: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b, h, lq, d = shape_q
    return [torch.randn(s, generator=gen).to(dtype) for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d),
                                                             (b, h, lq, d))]


def make_mask(batch: int, lk: int, seed: int, empty_batch: Optional[int] = None) -> torch.Tensor:
    """Random T5-like padding: each sample keeps a prefix of random length (>= 1)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, lk + 1, (batch,), generator=gen)
    mask = torch.arange(lk)[None, :] < lengths[:, None]
    if empty_batch is not None:
        mask[empty_batch] = False
    return mask


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def run_and_compare(q, k, v, grad_out, mask, causal, tol, scale=None) -> tuple:
    """Kernel fwd+bwd vs the oracle; returns the kernel's (out, dq, dk, dv) for extra checks."""
    scale_val = q.shape[-1] ** -0.5 if scale is None else scale
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = kernels.attention(*leaves, key_padding_mask=mask, causal=causal, scale=scale)
    out.backward(grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_leaves, mask, causal, scale_val)
    ref.backward(grad_out.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    for name, got, want in [("out", out, ref)] + [(f"d{n}", a.grad, b.grad) for n, a, b in
                                                  zip("qkv", leaves, ref_leaves)]:
        assert torch.isfinite(got).all(), name
        assert got.dtype == q.dtype, name
        assert rel_err(got, want) < tol, f"{name}: {rel_err(got, want):.2e}"
    return (out, *(t.grad for t in leaves))


CASES = [  # (B, H, Lq, D), Lk, causal, masked
    pytest.param((1, 2, 64, 64), 64, False, False, id="self-64"),
    pytest.param((1, 1, 128, 32), 128, False, False, id="self-128-d32"),
    pytest.param((2, 2, 80, 32), 37, False, True, id="cross-80x37-mask"),
    pytest.param((1, 2, 33, 64), 77, False, False, id="cross-33x77"),
    pytest.param((1, 1, 5, 16), 3, False, True, id="tiny"),
    pytest.param((1, 2, 70, 64), 70, True, False, id="causal-70"),
    pytest.param((2, 1, 48, 32), 48, True, True, id="causal-48-mask"),
    pytest.param((1, 2, 33, 40), 50, False, True, id="d40-padded"),
    pytest.param((1, 1, 20, 80), 24, False, False, id="d80-padded"),
    pytest.param((1, 1, 24, 128), 40, False, True, id="d128"),
]


@pytest.mark.parametrize("shape_q, lk, causal, masked", CASES)
def test_matches_fp64_oracle(shape_q: tuple, lk: int, causal: bool, masked: bool) -> None:
    q, k, v, grad_out = make_inputs(shape_q, lk, torch.float32, seed=sum(shape_q) + lk)
    mask = make_mask(shape_q[0], lk, seed=lk) if masked else None
    run_and_compare(q, k, v, grad_out, mask, causal, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision(dtype: torch.dtype, causal: bool) -> None:
    lk = 64 if causal else 45
    q, k, v, grad_out = make_inputs((2, 2, 64, 64), lk, dtype, seed=7)
    run_and_compare(q, k, v, grad_out, make_mask(2, lk, seed=3), causal, TOL[dtype])


def test_dkdv_query_split_for_few_keys() -> None:
    """Few keys, many queries: the dK/dV kernel splits the query range and sums fp32 partials."""
    assert flash_bwd._query_splits(300, 20, 2, False, torch.device("cpu"))[0] == 3
    q, k, v, grad_out = make_inputs((2, 1, 300, 32), 20, torch.float32, seed=17)
    run_and_compare(q, k, v, grad_out, make_mask(2, 20, seed=17), False, TOL[torch.float32])


def test_custom_scale() -> None:
    q, k, v, grad_out = make_inputs((1, 1, 24, 32), 40, torch.float32, seed=11)
    run_and_compare(q, k, v, grad_out, None, False, TOL[torch.float32], scale=0.3)


def test_fully_padded_rows_give_zero_output_and_grads() -> None:
    q, k, v, grad_out = make_inputs((3, 2, 40, 32), 29, torch.float32, seed=5)
    mask = make_mask(3, 29, seed=1, empty_batch=1)
    out, dq, dk, dv = run_and_compare(q, k, v, grad_out, mask, False, TOL[torch.float32])
    for t in (out, dq, dk, dv):
        assert torch.equal(t[1], torch.zeros_like(t[1]))
    assert torch.equal(dk[0][:, ~mask[0]], torch.zeros_like(dk[0][:, ~mask[0]]))  # padded keys: no gradient


def test_causal_with_leading_padding_has_empty_rows() -> None:
    """Left-padded keys + causal: the first query rows see no key at all."""
    q, k, v, grad_out = make_inputs((2, 1, 36, 16), 36, torch.float32, seed=9)
    mask = torch.ones(2, 36, dtype=torch.bool)
    mask[0, :20] = False
    out, dq, _, _ = run_and_compare(q, k, v, grad_out, mask, True, TOL[torch.float32])
    assert torch.equal(out[0, :, :20], torch.zeros_like(out[0, :, :20]))
    assert torch.equal(dq[0, :, :20], torch.zeros_like(dq[0, :, :20]))


def test_non_contiguous_inputs_and_stride0_grad() -> None:
    gen = torch.Generator().manual_seed(21)
    b, h, lq, lk, d = 2, 2, 40, 30, 32
    q = torch.randn(b, lq, h, d, generator=gen).transpose(1, 2)  # (B, L, H, D) model layout, viewed
    kv = torch.randn(b, lk, 2, h, d, generator=gen)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = make_mask(b, lk, seed=2)
    run_and_compare(q, k, v, torch.randn(b, h, lq, d, generator=gen), mask, False, TOL[torch.float32])
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kernels.attention(*leaves, key_padding_mask=mask).sum().backward()  # grad_out is an expanded stride-0 ones
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle(*ref_leaves, mask, False, d ** -0.5).sum().backward()
    for a, r in zip(leaves, ref_leaves):
        assert rel_err(a.grad, r.grad) < TOL[torch.float32]


def test_reference_matches_oracle() -> None:
    q, k, v, _ = make_inputs((2, 2, 17, 8), 13, torch.float64, seed=4)
    mask = make_mask(2, 13, seed=6, empty_batch=0)
    got = reference.attention(q, k, v, key_padding_mask=mask)
    assert torch.allclose(got, oracle(q, k, v, mask, False, 8 ** -0.5), atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(causal=True), "causal=True needs Lq == Lk"),
    (dict(key_padding_mask=torch.ones(1, 7)), "key_padding_mask must be a bool"),
    (dict(key_padding_mask=torch.ones(1, 6, dtype=torch.bool)), r"shape \(1, 7\)"),
])
def test_invalid_inputs_raise(kwargs: dict, match: str) -> None:
    q, k, v, _ = make_inputs((1, 1, 5, 16), 7, torch.float32, seed=0)
    with pytest.raises(ValueError, match=match):
        kernels.attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.attention(q, k.double(), v)


@pytest.mark.parametrize("masked", [True, False])
def test_opcheck_forward(masked: bool) -> None:
    q, k, v, _ = make_inputs((1, 2, 24, 16), 20, torch.float32, seed=8)
    args = [t.requires_grad_() for t in (q, k, v)]
    mask = make_mask(1, 20, seed=8) if masked else None
    torch.library.opcheck(torch.ops.t2i_kernels.flash_attn_fwd.default, (*args, mask, False, 0.25))


def test_opcheck_backward() -> None:
    q, k, v, grad_out = make_inputs((1, 1, 24, 16), 24, torch.float32, seed=12)
    mask = make_mask(1, 24, seed=12)
    out, lse = torch.ops.t2i_kernels.flash_attn_fwd(q, k, v, mask, True, 0.25)
    torch.library.opcheck(torch.ops.t2i_kernels.flash_attn_bwd.default,
                          (grad_out, q, k, v, out, lse, mask, True, 0.25))


def test_torch_compile_fullgraph() -> None:
    q, k, v, grad_out = make_inputs((1, 2, 32, 16), 19, torch.float32, seed=13)
    mask = make_mask(1, 19, seed=13)

    def layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return kernels.attention(q * 2.0, k, v, key_padding_mask=mask).relu()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask)
        out.backward(grad_out)
        results.append((out, *(t.grad for t in leaves)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)


GPU_CONFIGS = list(zip(flash_fwd.FWD_GPU_CONFIGS, itertools.cycle(flash_bwd.DKDV_GPU_CONFIGS),
                       itertools.cycle(flash_bwd.DQ_GPU_CONFIGS)))


@pytest.mark.parametrize("configs", GPU_CONFIGS, ids=[str(i) for i in range(len(GPU_CONFIGS))])
def test_gpu_block_configs_in_interpreter(configs: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block shape the GPU autotuner may pick gives the same answer (tile-edge and causal-split logic)."""
    kernels_ = (flash_fwd._flash_fwd_kernel, flash_bwd._bwd_dkdv_kernel, flash_bwd._bwd_dq_kernel)
    for kernel, config in zip(kernels_, configs):
        monkeypatch.setattr(kernel, "configs", [config])
    for shape_q, lk, causal in (((1, 1, 200, 32), 200, True), ((1, 1, 150, 32), 77, False)):
        q, k, v, grad_out = make_inputs(shape_q, lk, torch.float32, seed=lk)
        mask = torch.ones(1, lk, dtype=torch.bool)
        mask[0, 5:9] = False
        mask[0, -3:] = False
        run_and_compare(q, k, v, grad_out, mask, causal, TOL[torch.float32])
