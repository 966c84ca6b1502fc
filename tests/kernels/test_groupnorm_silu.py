"""Fused GroupNorm + scale/shift + SiLU kernel (Triton interpreter on CPU) against a float64 oracle."""
from __future__ import annotations

from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import gn_silu_triton, reference

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # max error / max |reference|


def oracle(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], groups: int, eps: float,
           scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], apply_silu: bool) -> torch.Tensor:
    """Float64 group norm written out by hand (biased variance), then modulation and SiLU."""
    b, c = x.shape[:2]
    xg = x.double().reshape(b, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    per_channel = (b, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.double().reshape((1, c) + per_channel[2:])
    if bias is not None:
        y = y + bias.double().reshape((1, c) + per_channel[2:])
    if scale is not None:
        y = y * (1 + scale.double().reshape(per_channel))
    if shift is not None:
        y = y + shift.double().reshape(per_channel)
    return y * torch.sigmoid(y) if apply_silu else y


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-3)).item()


def check(shape: tuple, groups: int, *, affine: bool = True, modulate: bool = True, apply_silu: bool = True,
          dtype: torch.dtype = torch.float32, offset: float = 0.5, seed: int = 0,
          channels_last: bool = False, tol: Optional[float] = None) -> None:
    tol = TOL[dtype] if tol is None else tol
    gen = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x = (torch.randn(shape, generator=gen) * 2.0 + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = (torch.randn(c, generator=gen), torch.randn(c, generator=gen)) if affine else (None, None)
    scale, shift = (torch.randn(b, c, generator=gen), torch.randn(b, c, generator=gen)) if modulate else (None, None)
    grad_y = torch.randn(shape, generator=gen).to(dtype)
    inputs = [x, weight, bias, scale, shift]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = kernels.group_norm_silu(leaves[0], leaves[1], leaves[2], groups, 1e-5, leaves[3], leaves[4], apply_silu)
    y.backward(grad_y)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ref = oracle(ref_leaves[0], ref_leaves[1], ref_leaves[2], groups, 1e-5, ref_leaves[3], ref_leaves[4], apply_silu)
    ref.backward(grad_y.double())
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, ref) < tol, f"y: {rel_err(y, ref):.2e}"
    for name, got, want in zip(["x", "weight", "bias", "scale", "shift"], leaves, ref_leaves):
        if got is None:
            continue
        assert got.grad.dtype == got.dtype, name
        assert rel_err(got.grad, want.grad) < tol, f"d{name}: {rel_err(got.grad, want.grad):.2e}"


@pytest.mark.parametrize("shape, groups", [((2, 8, 6, 5), 4), ((2, 6, 100), 3), ((3, 12, 3, 4, 2), 2),
                                           ((3, 12), 2), ((1, 32, 4, 4), 32)])
def test_shapes_with_scale_shift(shape: tuple, groups: int) -> None:
    check(shape, groups, seed=len(shape) + groups)


def test_no_scale_shift() -> None:
    check((2, 6, 7, 3), 3, modulate=False, seed=1)


def test_without_silu() -> None:
    check((2, 8, 5, 5), 2, apply_silu=False, seed=2)


def test_without_affine() -> None:
    check((2, 4, 9), 2, affine=False, seed=3)


def test_large_mean_is_stable() -> None:
    """Mean 1000x the std: a sum-of-squares variance in fp32 would be off by percents. Rounding the mean to
    fp32 alone costs ~6e-5 relative in x - mean, hence the looser bound."""
    check((2, 4, 8, 8), 2, modulate=False, offset=2000.0, seed=4, tol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    check((2, 8, 6, 6), 4, dtype=dtype, seed=5)


def test_channels_last_input() -> None:
    check((2, 8, 5, 4), 4, channels_last=True, seed=6)


def test_reference_matches_torch() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 3, 3, generator=gen, dtype=torch.float64)
    w, b = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    want = F.silu(F.group_norm(x, 4, w, b, 1e-5))
    torch.testing.assert_close(reference.group_norm_silu(x, w, b, 4), want)
    scale, shift = torch.randn(2, 8, generator=gen, dtype=torch.float64), torch.randn(2, 8, generator=gen,
                                                                                      dtype=torch.float64)
    got = reference.group_norm_silu(x, w, b, 4, scale=scale, shift=shift, apply_silu=False)
    torch.testing.assert_close(got, oracle(x, w, b, 4, 1e-5, scale, shift, False))


def test_invalid_inputs_raise() -> None:
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="must divide"):
        kernels.group_norm_silu(x, None, None, 4)
    with pytest.raises(ValueError, match="scale must be"):
        kernels.group_norm_silu(x, None, None, 3, scale=torch.randn(6))


def _gn_args(seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 3, 3, generator=gen), torch.randn(4, generator=gen), torch.randn(4, generator=gen),
            torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen))


@pytest.mark.parametrize("optional", [True, False])
def test_opcheck_forward(optional: bool) -> None:
    x, w, b, sc, sh = [t.requires_grad_() for t in _gn_args(8)]
    args = (x, w, b, sc, sh, 2, 1e-5, True) if optional else (x, None, b, None, sh, 2, 1e-5, False)
    torch.library.opcheck(torch.ops.t2i_kernels.group_norm_silu_fwd.default, args)


def test_opcheck_backward() -> None:
    x, w, b, sc, sh = _gn_args(9)
    _, mean, rstd = torch.ops.t2i_kernels.group_norm_silu_fwd(x, w, b, sc, sh, 2, 1e-5, True)
    grad_y = torch.randn_like(x)
    torch.library.opcheck(torch.ops.t2i_kernels.group_norm_silu_bwd.default,
                          (grad_y, x, w, b, sc, sh, mean, rstd, True))


def test_torch_compile_fullgraph() -> None:
    x, w, b, sc, sh = _gn_args(10)

    def block(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        return kernels.group_norm_silu(x * 1.5, w, b, 2, scale=sc).sum()

    grads = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, sc)]
        fn(*leaves).backward()
        grads.append([t.grad for t in leaves])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager)


@pytest.mark.parametrize("config", gn_silu_triton.GN_GPU_CONFIGS[:3], ids=["1024", "2048", "2048w8"])
def test_gpu_tile_configs_in_interpreter(config, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU tile sizes: several position tiles per channel (S = 1600) and several channels per tile (S = 49)."""
    for kernel in (gn_silu_triton._gn_fwd_kernel, gn_silu_triton._gn_bwd_kernel):
        monkeypatch.setattr(kernel, "configs", [config])
    check((2, 4, 40, 40), 2, seed=11)
    check((2, 40, 7, 7), 4, seed=12)
