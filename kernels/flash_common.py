"""Triton helpers shared by the flash-attention forward and backward kernels.

Conventions used by every attention kernel here:
- scores live in log2 units: ``s = (q . k) * scale * log2(e)`` so the softmax uses ``exp2`` (one MUFU op);
  the kernels keep ``q . k`` unscaled and apply the (positive) factor inside ``exp2(s * qk_scale - m)``,
  a single FMA per score;
- the saved ``lse`` is the log2-sum-exp2 of a query row's scores, and ``+inf`` for a row whose keys are
  all masked, so that ``exp2(s - lse)`` is exactly 0 there in the backward (no NaN, zero gradients);
- the head dim is padded to ``BLOCK_D`` (a power of two) with masked loads; padded columns load as 0
  and so add nothing to the dot products.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols,
              CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a (len(rows), len(cols)) tile; out-of-range elements read as 0.

    The bounds checks are compile-time switches so that full interior tiles load without predicates.
    """
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def load_keep(mask_base, cols, stride_ml, Lk, CHECK: tl.constexpr):
    """Key padding mask for key indices ``cols`` (1-D): True = attend. Out-of-range keys read as padded."""
    if CHECK:
        keep = tl.load(mask_base + cols * stride_ml, mask=cols < Lk, other=0)
    else:
        keep = tl.load(mask_base + cols * stride_ml)
    return keep != 0


@triton.jit
def mask_scores(s, q_idx, k_idx, Lk, BOUNDARY: tl.constexpr, CAUSAL_TILE: tl.constexpr):
    """Set scores of out-of-range keys (``BOUNDARY``) and of future keys (``CAUSAL_TILE``) to -inf.

    ``q_idx``/``k_idx`` are index vectors already expanded to broadcast against ``s``, so the same helper
    serves the (queries, keys) tiles of the forward/dQ kernels and the (keys, queries) tiles of dK/dV.
    """
    if BOUNDARY:
        s = tl.where(k_idx < Lk, s, float("-inf"))
    if CAUSAL_TILE:
        s = tl.where(q_idx >= k_idx, s, float("-inf"))
    return s


def mask_args(mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Kernel arguments for an optional (B, Lk) bool mask: (pointer tensor, batch stride, key stride).

    A bool tensor is reinterpreted as uint8 (same bytes, no copy) because Triton loads bytes more predictably
    than i1 pointers. Without a mask, any tensor stands in for the pointer; HAS_MASK=False never reads it.
    """
    if mask is None:
        return fallback, 0, 0
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)
