"""Fused GroupNorm + scale/shift + SiLU as torch custom ops (``t2i_kernels::group_norm_silu_fwd`` / ``_bwd``).

The backward kernel returns dx plus two per-(batch, channel) sums; the small parameter gradients are
finished here with (B, C)-sized torch ops, which keeps the kernel free of cross-program reductions.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from kernels._runtime import SUPPORTED_DTYPES, require_kernel_device
from kernels.gn_silu_triton import _gn_bwd_kernel, _gn_fwd_kernel


def _flags(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], scale: Optional[torch.Tensor],
           shift: Optional[torch.Tensor], apply_silu: bool) -> dict:
    return dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
                HAS_SHIFT=shift is not None, APPLY_SILU=apply_silu)


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


@torch.library.custom_op("t2i_kernels::group_norm_silu_fwd", mutates_args=())
def group_norm_silu_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int,
                        eps: float, apply_silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, C, *spatial); weight/bias: (C,) or None; scale/shift: (B, C) or None.

    Returns (y like x but contiguous, mean (B, G) fp32, rstd (B, G) fp32).
    """
    require_kernel_device(x, "t2i_kernels::group_norm_silu_fwd")
    batch, channels = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    x = x.contiguous()
    y = torch.empty_like(x)
    mean = torch.empty((batch, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    w, b, sc, sh = (_contig(t) for t in (weight, bias, scale, shift))
    _gn_fwd_kernel[(batch * num_groups,)](
        x, y, w, b, sc, sh, mean, rstd, channels, spatial, num_groups, channels // num_groups, eps,
        **_flags(weight, bias, scale, shift, apply_silu))
    return y, mean, rstd


@group_norm_silu_fwd.register_fake
def _fwd_fake(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], num_groups: int, eps: float,
              apply_silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("t2i_kernels::group_norm_silu_bwd", mutates_args=())
def group_norm_silu_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        mean: torch.Tensor, rstd: torch.Tensor,
                        apply_silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx like x but contiguous, sum_du (B, C) fp32, sum_du_xhat (B, C) fp32), where du is the
    gradient at the pre-activation and xhat the normalized x."""
    require_kernel_device(x, "t2i_kernels::group_norm_silu_bwd")
    batch, channels = x.shape[:2]
    num_groups = mean.shape[1]
    x = x.contiguous()
    grad_y = grad_y.contiguous()
    dx = torch.empty_like(x)
    sum_du = torch.empty((batch, channels), dtype=torch.float32, device=x.device)
    sum_du_xhat = torch.empty_like(sum_du)
    w, b, sc, sh = (_contig(t) for t in (weight, bias, scale, shift))
    _gn_bwd_kernel[(batch * num_groups,)](
        x, grad_y, dx, w, b, sc, sh, mean, rstd, sum_du, sum_du_xhat, channels, math.prod(x.shape[2:]),
        num_groups, channels // num_groups, **_flags(weight, bias, scale, shift, apply_silu))
    return dx, sum_du, sum_du_xhat


@group_norm_silu_bwd.register_fake
def _bwd_fake(grad_y: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
              apply_silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sums = x.new_empty(x.shape[:2], dtype=torch.float32)
    return x.new_empty(x.shape), sums, torch.empty_like(sums)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, bias, scale, shift, _num_groups, _eps, apply_silu = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.apply_silu = apply_silu
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx: Any, grad_y: torch.Tensor, _grad_mean: Any, _grad_rstd: Any) -> tuple:
    """dx from the kernel; with gain = 1 + scale and n = xhat * weight + bias:
    dshift = sum_s du, dscale = sum_s du * n, dbias = sum_b gain * sum_s du, dweight = sum_b gain * sum_s du*xhat."""
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, sum_du, sum_du_xhat = group_norm_silu_bwd(grad_y, x, weight, bias, scale, shift, mean, rstd,
                                                  ctx.apply_silu)
    gain = 1.0 + scale.float() if scale is not None else torch.ones_like(sum_du)
    d_weight = (gain * sum_du_xhat).sum(0).to(weight.dtype) if weight is not None else None
    d_bias = (gain * sum_du).sum(0).to(bias.dtype) if bias is not None else None
    d_shift = sum_du.to(shift.dtype) if shift is not None else None
    d_scale = None
    if scale is not None:
        n_sum = sum_du_xhat * (weight.float() if weight is not None else 1.0)
        if bias is not None:
            n_sum = n_sum + sum_du * bias.float()
        d_scale = n_sum.to(scale.dtype)
    return dx, d_weight, d_bias, d_scale, d_shift, None, None, None


torch.library.register_autograd("t2i_kernels::group_norm_silu_fwd", _backward, setup_context=_setup_context)


def _validate(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
              scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> None:
    """Raise ValueError naming the offending argument."""
    if x.dim() < 2 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"group_norm_silu: x must be (B, C, *spatial) of {SUPPORTED_DTYPES}; "
                         f"got {tuple(x.shape)} {x.dtype}")
    batch, channels = x.shape[:2]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"group_norm_silu: num_groups={num_groups} must divide the {channels} channels")
    for name, t, shape in (("weight", weight, (channels,)), ("bias", bias, (channels,)),
                           ("scale", scale, (batch, channels)), ("shift", shift, (batch, channels))):
        if t is None:
            continue
        if tuple(t.shape) != shape or not t.is_floating_point() or t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} must be a float tensor of shape {shape} on {x.device}; "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def group_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                    eps: float = 1e-5, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                    apply_silu: bool = True) -> torch.Tensor:
    """Fused ``silu(group_norm(x) * (1 + scale) + shift)`` (Triton), differentiable in every tensor argument.

    x: (B, C, *spatial) fp16/bf16/fp32 (made contiguous); weight, bias: (C,) or None; scale, shift:
    (B, C) or None (per-sample, per-channel modulation, e.g. a U-Net ResBlock's timestep embedding).
    Statistics and arithmetic are fp32. Returns a contiguous tensor shaped and typed like x.
    """
    _validate(x, weight, bias, num_groups, scale, shift)
    return group_norm_silu_fwd(x, weight, bias, scale, shift, num_groups, float(eps), apply_silu)[0]
