"""Flash attention as torch custom ops (``t2i_kernels::flash_attn_fwd`` / ``t2i_kernels::flash_attn_bwd``).

The ops are opaque to ``torch.compile`` (fake implementations give output metadata) and differentiable
through ``register_autograd``. ``attention`` is the public entry point: it validates and resolves defaults,
so the ops themselves always see a concrete ``scale`` and well-formed inputs.

Causal masking is defined for Lq == Lk only (query i attends keys 0..i, the usual top-left alignment,
matching ``F.scaled_dot_product_attention(is_causal=True)``); Lq != Lk with ``causal=True`` raises.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from kernels._runtime import SUPPORTED_DTYPES, require_kernel_device
from kernels.flash_bwd import flash_bwd
from kernels.flash_fwd import flash_fwd

MAX_HEAD_DIM = 256
MAX_BATCH_HEADS = 65535  # the kernels put B*H on CUDA grid axis 1


@torch.library.custom_op("t2i_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                   causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), key_padding_mask: (B, Lk) bool (True = keep) or None.

    Returns (out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) fp32 in log2 units, +inf for all-padded rows).
    """
    require_kernel_device(q, "t2i_kernels::flash_attn_fwd")
    return flash_fwd(q, k, v, key_padding_mask, causal, scale)


@flash_attn_fwd.register_fake
def _flash_attn_fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_padding_mask: Optional[torch.Tensor], causal: bool,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = q.new_empty(q.shape)  # contiguous, like the real kernel's output
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("t2i_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), contiguous, shaped/typed like q, k, v. lse: the forward's (B, H, Lq) fp32."""
    require_kernel_device(q, "t2i_kernels::flash_attn_bwd")
    return flash_bwd(grad_out, q, k, v, out, lse, key_padding_mask, causal, scale)


@flash_attn_bwd.register_fake
def _flash_attn_bwd_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                         causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal = causal
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor]) -> tuple:
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(grad_out, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("t2i_kernels::flash_attn_fwd", _backward, setup_context=_setup_context)


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
              causal: bool) -> None:
    """Raise ValueError naming the offending argument for anything the kernels do not support."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be 4-D (B, H, L, D); got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: q, k, v must share one dtype of {SUPPORTED_DTYPES}; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    batch, heads, lq, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, heads) or k.shape[3] != head_dim:
        raise ValueError(f"attention: expected k and v of shape ({batch}, {heads}, Lk, {head_dim}); "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    lk = k.shape[2]
    if lq == 0 or lk == 0 or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: need Lq, Lk >= 1 and 1 <= D <= {MAX_HEAD_DIM}; "
                         f"got Lq={lq}, Lk={lk}, D={head_dim}")
    if batch * heads > MAX_BATCH_HEADS:
        raise ValueError(f"attention: B*H = {batch * heads} exceeds {MAX_BATCH_HEADS}; split the batch")
    if causal and lq != lk:
        raise ValueError(f"attention: causal=True needs Lq == Lk (query i attends keys 0..i); got Lq={lq}, Lk={lk}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, lk):
            raise ValueError(f"attention: key_padding_mask must be a bool tensor of shape ({batch}, {lk}) "
                             f"(True = keep); got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
              causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Fused scaled-dot-product attention (Triton flash attention, forward and backward).

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); fp16, bf16 or fp32 (one dtype), any strides; D <= 256
    (non-power-of-two D is padded inside the kernel). key_padding_mask: (B, Lk) bool, True = attend.
    causal: query i attends keys 0..i; needs Lq == Lk. scale: > 0, defaults to D ** -0.5.
    Returns (B, H, Lq, D) in q's dtype. A query row whose keys are all padded gives 0 and zero gradients.
    """
    _validate(q, k, v, key_padding_mask, causal)
    scale = float(q.shape[-1] ** -0.5) if scale is None else float(scale)
    if not scale > 0.0:  # the kernels fold the scale into exp2 and need it positive
        raise ValueError(f"attention: scale must be > 0, got {scale}")
    return flash_attn_fwd(q, k, v, key_padding_mask, causal, scale)[0]
