"""Attention and GroupNorm+SiLU dispatch for the model code, chosen by the config key
``attention: sdpa | triton | xformers``.

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (works everywhere; the default) and the
  plain-PyTorch GroupNorm + SiLU reference;
- ``triton``: the fused Triton kernels in :mod:`kernels` (CUDA; CPU only through the Triton interpreter);
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only) and the PyTorch GroupNorm path.

Every backend computes the same function, so checkpoints never depend on the backend: parameters are
named like ``nn.GroupNorm``'s and the backend is not part of the state dict. Shapes follow
``(B, H, L, D)``; a key padding mask is ``(B, Lk)`` bool with True = attend; a query row whose keys are
all masked returns zeros (and zero gradients) on every backend, never NaN.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import reference

ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "triton", "xformers")


def check_backend(backend: str) -> str:
    """Return ``backend`` if valid, else raise a ValueError that lists the valid names."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(ATTENTION_BACKENDS)} "
                         "(config key `attention`)")
    return backend


def _visible_keys(key_padding_mask: Optional[torch.Tensor], causal: bool, lq: int, lk: int,
                  device: torch.device) -> Optional[torch.Tensor]:
    """Boolean "may attend" mask broadcastable to (B, H, Lq, Lk): (B, 1, 1, Lk), (1, 1, Lq, Lk),
    (B, 1, Lq, Lk), or None when nothing is masked."""
    keep = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if causal:
        tril = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()[None, None]
        keep = tril if keep is None else keep & tril
    return keep


def _check_inputs(q: torch.Tensor, k: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  causal: bool) -> None:
    """Checks shared by every backend so they all accept exactly the same inputs."""
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs as many queries as keys; got Lq={q.shape[-2]}, Lk={k.shape[-2]}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[-2])):
        raise ValueError(f"key_padding_mask must be bool of shape (B, Lk) = ({k.shape[0]}, {k.shape[-2]}), "
                         f"True = attend; got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 causal: bool, scale: Optional[float]) -> torch.Tensor:
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    keep = _visible_keys(key_padding_mask, causal, q.shape[-2], k.shape[-2], q.device)
    has_key = keep.any(dim=-1, keepdim=True)
    # SDPA returns NaN for a row with no visible key: let such rows see every key, then zero them;
    # the multiply by 0 also zeroes their gradients.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~has_key, scale=scale)
    return out * has_key.to(out.dtype)


def xformers_bias(keep: torch.Tensor, heads: int, lq: int, like: torch.Tensor) -> torch.Tensor:
    """Additive bias (B, H, Lq, Lk) in ``like``'s dtype from a "may attend" mask (B, 1, 1|Lq, Lk) with at
    least one True per row: 0 where kept, -inf elsewhere.

    xformers needs every bias stride but the last to be a multiple of 8 elements, so the rows are slices
    of a buffer padded to a multiple of 8 keys, broadcast over heads (and queries) with stride 0.
    """
    batch, _, rows, lk = keep.shape
    bias = like.new_zeros(batch, 1, rows, (lk + 7) // 8 * 8)[..., :lk]
    bias.masked_fill_(~keep, float("-inf"))  # in place: an out-of-place result would lose the padding
    return bias.expand(batch, heads, lq, lk)


def _attend_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                     causal: bool, scale: Optional[float]) -> torch.Tensor:
    if q.device.type != "cuda":
        raise RuntimeError(f"attention backend 'xformers' needs CUDA tensors (xformers has no CPU kernels); got "
                           f"{q.device}. Use `attention: sdpa` on CPU.")
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise ImportError("attention backend 'xformers' needs the xformers package (pip install xformers), "
                          "or use `attention: sdpa`") from err
    batch, heads, lq, _ = q.shape
    bias, has_key = (xops.LowerTriangularMask() if causal else None), None
    if key_padding_mask is not None:
        keep = _visible_keys(key_padding_mask, causal, lq, k.shape[-2], q.device)
        has_key = keep.any(dim=-1, keepdim=True)
        bias = xformers_bias((keep | ~has_key).expand(batch, 1, keep.shape[2], -1), heads, lq, q)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, scale=scale).transpose(1, 2)
    return out if has_key is None else out * has_key.to(out.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
           causal: bool = False, backend: str = "sdpa", scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention through the chosen backend.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_padding_mask: (B, Lk) bool, True = attend (e.g. T5 tokens);
    causal: query i attends keys 0..i (needs Lq == Lk); scale: defaults to D ** -0.5.
    Returns (B, H, Lq, D) in q's dtype.
    """
    check_backend(backend)
    _check_inputs(q, k, key_padding_mask, causal)
    if backend == "triton":
        return kernels.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=scale)
    if backend == "xformers":
        return _attend_xformers(q, k, v, key_padding_mask, causal, scale)
    return _attend_sdpa(q, k, v, key_padding_mask, causal, scale)


def group_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                    eps: float = 1e-5, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                    apply_silu: bool = True, backend: str = "sdpa") -> torch.Tensor:
    """``silu(group_norm(x) * (1 + scale) + shift)``: fused Triton kernel for ``triton``, PyTorch otherwise.

    x: (B, C, *spatial); weight, bias: (C,) or None; scale, shift: (B, C) or None. Returns x's shape/dtype.
    """
    check_backend(backend)
    if backend == "triton":
        return kernels.group_norm_silu(x, weight, bias, num_groups, eps, scale, shift, apply_silu)
    return reference.group_norm_silu(x, weight, bias, num_groups, eps, scale, shift, apply_silu)


class GroupNormSiLU(nn.Module):
    """GroupNorm (fp32 statistics) with optional per-sample scale/shift and SiLU, as in a U-Net ResBlock.

    Parameters are ``weight``/``bias`` of shape (C,), named like ``nn.GroupNorm``'s, so a state dict loads
    into either and does not depend on ``backend``.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, apply_silu: bool = True,
                 affine: bool = True, backend: str = "sdpa") -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNormSiLU: num_groups={num_groups} must divide num_channels={num_channels}")
        self.num_groups = num_groups
        self.eps = eps
        self.apply_silu = apply_silu
        self.backend = check_backend(backend)
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, C, *spatial); scale, shift: (B, C) or None. Returns x's shape and dtype."""
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, scale, shift,
                               self.apply_silu, self.backend)

    def extra_repr(self) -> str:
        return f"groups={self.num_groups}, eps={self.eps}, silu={self.apply_silu}, backend={self.backend}"
