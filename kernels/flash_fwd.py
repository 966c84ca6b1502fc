"""Flash-attention forward kernel (online softmax over key tiles held in SRAM, fp32 accumulation).

One program computes one (BLOCK_M queries) x (one batch, one head) output tile. Key tiles are visited in
two loops: "full" tiles that need no masking except the key padding mask, then "edge" tiles (the causal
diagonal, or the last partial key tile) that also mask by position. That keeps the hot loop free of
per-element position predicates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._runtime import INTERPRET, LOG2E, dot_precision, padded_head_dim, pick_configs
from kernels.flash_common import load_keep, load_tile, mask_args, mask_scores


# H100-oriented search space; BLOCK_M is a multiple of BLOCK_N so causal tiles split cleanly.
FWD_GPU_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 128, 8, 2),
        (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 32, 2, 3),
        (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2),  # shallow pipelines for head dims padded to 256
    ]
]
# Interpreter: small, unequal blocks so tests exercise multi-tile loops and the causal split.
_FWD_CONFIGS = pick_configs(FWD_GPU_CONFIGS, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4,
                                                           num_stages=1))


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles that cannot fit SRAM/registers for wide heads, and blocks far larger than the sequence."""
    block_d, lq, lk = kwargs["BLOCK_D"], named_args["Lq"], named_args["Lk"]
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if block_d >= 256 and (bm * bn > 128 * 32 or c.num_stages > 2):
            continue
        if (bm > 64 and lq <= 64) or (bn > 32 and lk <= 32):
            continue
        kept.append(c)
    return kept or configs[-1:]


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d,
              Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_ml, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOUNDARY: tl.constexpr,
              CAUSAL_TILE: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """One online-softmax step over the key tile starting at ``start_n``. acc: (BLOCK_M, BLOCK_D) fp32."""
    cols = start_n + offs_n
    k = load_tile(k_base, cols, offs_d, stride_kn, stride_kd, Lk, HEAD_DIM, BOUNDARY, BLOCK_D != HEAD_DIM)
    v = load_tile(v_base, cols, offs_d, stride_vn, stride_vd, Lk, HEAD_DIM, BOUNDARY, BLOCK_D != HEAD_DIM)
    if UPCAST:  # interpreter only: its bf16 arithmetic is wrong, fp32 is exact enough
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # unscaled: the scale folds into one FMA below
    s = mask_scores(s, offs_m[:, None], cols[None, :], Lk, BOUNDARY, CAUSAL_TILE)
    if HAS_MASK:
        s = tl.where(load_keep(mask_base, cols, stride_ml, Lk, BOUNDARY)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # qk_scale > 0, so max commutes with the scaling
    # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead avoids (-inf) - (-inf) = NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.autotune(configs=_FWD_CONFIGS, key=["Lq", "Lk", "HEAD_DIM", "CAUSAL", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _flash_fwd_kernel(Q, K, V, Mask, Out, Lse,
                      stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                      stride_mb, stride_ml, H, Lq, Lk, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M), B*H). Writes Out (B, H, Lq, D) and Lse (B, H, Lq) fp32, log2 units."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)  # int64: batch/head offsets can exceed 2**31 elements
    b = off_bh // H
    h = off_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Lq, HEAD_DIM,
                  True, BLOCK_D != HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:  # Lq == Lk: keys before this query block are fully visible, the diagonal block is masked
        full_hi = start_m
        edge_hi = tl.minimum(start_m + BLOCK_M, Lk)
    else:
        full_hi = (Lk // BLOCK_N) * BLOCK_N
        edge_hi = Lk
    for start_n in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d,
                                  Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_ml, qk_scale,
                                  HEAD_DIM, BLOCK_D, False, False, HAS_MASK, UPCAST, DOT_PREC)
    for start_n in range(full_hi, edge_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d,
                                  Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_ml, qk_scale,
                                  HEAD_DIM, BLOCK_D, True, CAUSAL, HAS_MASK, UPCAST, DOT_PREC)
    # All-padded rows: l == 0. Output 0 and lse = +inf, so the backward's exp2(s - lse) is exactly 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + off_bh * Lq + offs_m, lse, mask=offs_m < Lq)


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
              causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated inputs.

    q: (B, H, Lq, D), k/v: (B, H, Lk, D), any strides; key_padding_mask: (B, Lk) bool or None.
    Returns out (B, H, Lq, D) contiguous in q's dtype and lse (B, H, Lq) fp32 (log2 units, +inf = empty row).
    """
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    out = torch.empty((batch, heads, lq, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, lq), dtype=torch.float32, device=q.device)
    mask, stride_mb, stride_ml = mask_args(key_padding_mask, q)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(lq, meta["BLOCK_M"]), batch * heads

    _flash_fwd_kernel[grid](
        q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), stride_mb, stride_ml,
        heads, lq, lk, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), CAUSAL=causal, HAS_MASK=key_padding_mask is not None,
        UPCAST=INTERPRET, DOT_PREC=dot_precision(q.dtype),
    )
    return out, lse
