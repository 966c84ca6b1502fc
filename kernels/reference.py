"""Plain-PyTorch reference implementations of the fused kernels.

They define the semantics the Triton kernels must match, serve as the always-available path (CPU,
no Triton) and, called on float64 inputs, as the test oracle. Half-precision inputs are computed in
fp32 and cast back, like the kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
              causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention by explicit matrices. q: (B, H, Lq, D); k, v: (B, H, Lk, D);
    key_padding_mask: (B, Lk) bool, True = attend; causal: query i attends keys 0..i (needs Lq == Lk).
    Returns (B, H, Lq, D) in q's dtype; rows with no visible key are 0 (and get zero gradients)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if causal and lq != lk:
        raise ValueError(f"reference.attention: causal=True needs Lq == Lk; got Lq={lq}, Lk={lk}")
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril()
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    keep = keep.expand(scores.shape)
    has_key = keep.any(dim=-1, keepdim=True)
    # Unmask empty rows before the softmax (no NaN, finite gradients), then zero them (zero gradients).
    scores = scores.masked_fill(~(keep | ~has_key), -math.inf)
    probs = torch.softmax(scores, dim=-1) * has_key
    return (probs @ v.to(compute)).to(q.dtype)


def group_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                    eps: float = 1e-5, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                    apply_silu: bool = True) -> torch.Tensor:
    """``silu(group_norm(x) * (1 + scale) + shift)``. x: (B, C, *spatial); weight, bias: (C,) or None;
    scale, shift: (B, C) or None. Returns x's shape and dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    as_compute = [None if t is None else t.to(compute) for t in (weight, bias, scale, shift)]
    weight_c, bias_c, scale_c, shift_c = as_compute
    y = F.group_norm(x.to(compute), num_groups, weight_c, bias_c, eps)
    per_channel = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    if scale_c is not None:
        y = y * (1.0 + scale_c.reshape(per_channel))
    if shift_c is not None:
        y = y + shift_c.reshape(per_channel)
    if apply_silu:
        y = F.silu(y)
    return y.to(x.dtype)
