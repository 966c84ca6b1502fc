"""Flash-attention backward: recompute P from the saved log-sum-exp, never store the (Lq, Lk) matrix.

Three deterministic kernels (no atomics):
1. ``_bwd_delta_kernel``: delta = rowsum(dO * O), (B, H, Lq) fp32;
2. ``_bwd_dkdv_kernel``: one program per key block loops over query blocks, accumulating dK and dV;
3. ``_bwd_dq_kernel``: one program per query block loops over key blocks, accumulating dQ.
Math (natural-log softmax, s = scale * q.k): dV = P^T dO, dP = dO V^T, dS = P * (dP - delta),
dQ = scale * dS K, dK = scale * dS^T Q. P is recomputed as exp2(s * log2(e) - lse2).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels._runtime import INTERPRET, LOG2E, dot_precision, padded_head_dim, pick_configs
from kernels.flash_common import load_keep, load_tile, mask_args, mask_scores


def _configs(outer: str, inner: str, shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """Configs over (outer block, inner block, warps, stages); outer is a multiple of inner (causal split)."""
    return [triton.Config({outer: o, inner: i}, num_warps=w, num_stages=s) for o, i, w, s in shapes]


_SHAPES = [(128, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (64, 16, 4, 2)]
# BLOCK_N keys per program, BLOCK_M queries per step; deeper pipelines help its long query loops.
DKDV_GPU_CONFIGS = _configs("BLOCK_N", "BLOCK_M", _SHAPES + [(128, 32, 4, 4), (128, 32, 4, 5), (128, 64, 8, 4)])
DQ_GPU_CONFIGS = _configs("BLOCK_M", "BLOCK_N", _SHAPES)  # BLOCK_M queries per program, BLOCK_N keys per step
# Interpreter: small, unequal blocks so tests exercise multi-tile loops and the causal split.
_DKDV_CONFIGS = pick_configs(DKDV_GPU_CONFIGS, _configs("BLOCK_N", "BLOCK_M", [(32, 16, 4, 1)])[0])
_DQ_CONFIGS = pick_configs(DQ_GPU_CONFIGS, _configs("BLOCK_M", "BLOCK_N", [(32, 16, 4, 1)])[0])


def _prune_wide(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Head dims padded to 256 need small tiles and shallow pipelines to fit SRAM."""
    if kwargs["BLOCK_D"] < 256:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 and c.num_stages <= 2]
    return small or configs[-1:]


@triton.jit
def _bwd_delta_kernel(Out, DO, Delta, stride_ob, stride_oh, stride_om, stride_od,
                      stride_dob, stride_doh, stride_dom, stride_dod, H, Lq,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M), B*H). Delta (B, H, Lq) fp32 = rowsum(dO * O)."""
    off_bh = tl.program_id(1).to(tl.int64)
    b = off_bh // H
    h = off_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, Lq, HEAD_DIM,
                  True, BLOCK_D != HEAD_DIM)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Lq, HEAD_DIM,
                   True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + off_bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dkdv_tile(dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, start_m, offs_m0, offs_n, offs_d,
               Lq, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL_TILE: tl.constexpr,
               HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate one query tile into dk, dv (BLOCK_N, BLOCK_D) fp32. Tiles are (keys, queries) oriented.

    Out-of-range queries need no position mask: they load q = dO = 0 and lse = +inf, hence P = dS = 0.
    """
    rows = start_m + offs_m0
    q = load_tile(q_base, rows, offs_d, stride_qm, stride_qd, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = load_tile(do_base, rows, offs_d, stride_dom, stride_dod, Lq, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_base + rows, mask=rows < Lq, other=float("inf"))
    delta = tl.load(delta_base + rows, mask=rows < Lq, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    s_t = mask_scores(s_t, rows[None, :], offs_n[:, None], 0, False, CAUSAL_TILE)
    if HAS_MASK:
        s_t = tl.where(keep[:, None], s_t, float("-inf"))
    p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["Lq", "Lk", "HEAD_DIM", "CAUSAL", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": _prune_wide})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Mask, DO, Lse, Delta, DK, DV,
                     stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                     stride_mb, stride_ml, H, Lq, Lk, scale, qk_scale, Q_CHUNK,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(Lk, BLOCK_N), B*H, splits). Program (n, bh, j) sums queries [j*Q_CHUNK, (j+1)*Q_CHUNK)
    into DK/DV[j], contiguous (splits, B, H, Lk, D); splits > 1 only without causal masking."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1).to(tl.int64)
    b = off_bh // H
    h = off_bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, Lk, HEAD_DIM,
                  True, BLOCK_D != HEAD_DIM)
    v = load_tile(V + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, Lk, HEAD_DIM,
                  True, BLOCK_D != HEAD_DIM)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    keep = offs_n < Lk
    if HAS_MASK:
        keep = load_keep(Mask + b * stride_mb, offs_n, stride_ml, Lk, True)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    split = tl.program_id(2)
    q_hi = tl.minimum((split + 1) * Q_CHUNK, Lq)
    if CAUSAL:  # queries before this key block see none of it; the diagonal band needs the causal mask
        lo = start_n
        full_lo = tl.minimum(start_n + BLOCK_N, Lq)
    else:
        lo = split * Q_CHUNK
        full_lo = lo
    for start_m in range(lo, full_lo, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, keep, q_base, do_base, Lse + off_bh * Lq, Delta + off_bh * Lq,
                            start_m, offs_m0, offs_n, offs_d, Lq, stride_qm, stride_qd, stride_dom, stride_dod,
                            qk_scale, HEAD_DIM, BLOCK_D, True, HAS_MASK, UPCAST, DOT_PREC)
    for start_m in range(full_lo, q_hi, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, keep, q_base, do_base, Lse + off_bh * Lq, Delta + off_bh * Lq,
                            start_m, offs_m0, offs_n, offs_d, Lq, stride_qm, stride_qd, stride_dom, stride_dod,
                            qk_scale, HEAD_DIM, BLOCK_D, False, HAS_MASK, UPCAST, DOT_PREC)
    out_off = (split * tl.num_programs(1) + off_bh) * Lk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    out_mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d,
             Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_ml, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOUNDARY: tl.constexpr, CAUSAL_TILE: tl.constexpr,
             HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate one key tile into dq (BLOCK_M, BLOCK_D) fp32."""
    cols = start_n + offs_n
    k = load_tile(k_base, cols, offs_d, stride_kn, stride_kd, Lk, HEAD_DIM, BOUNDARY, BLOCK_D != HEAD_DIM)
    v = load_tile(v_base, cols, offs_d, stride_vn, stride_vd, Lk, HEAD_DIM, BOUNDARY, BLOCK_D != HEAD_DIM)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    # Out-of-range keys load as 0 but would still get P = exp2(0 - lse) > 0, so they must be masked.
    s = mask_scores(s, offs_m[:, None], cols[None, :], Lk, BOUNDARY, CAUSAL_TILE)
    if HAS_MASK:
        s = tl.where(load_keep(mask_base, cols, stride_ml, Lk, BOUNDARY)[None, :], s, float("-inf"))
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)


@triton.autotune(configs=_DQ_CONFIGS, key=["Lq", "Lk", "HEAD_DIM", "CAUSAL", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": _prune_wide})
@triton.jit
def _bwd_dq_kernel(Q, K, V, Mask, DO, Lse, Delta, DQ,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_mb, stride_ml, H, Lq, Lk, scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M), B*H). DQ is contiguous (B, H, Lq, D) in the input dtype."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    b = off_bh // H
    h = off_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Lq, HEAD_DIM,
                  True, BLOCK_D != HEAD_DIM)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Lq, HEAD_DIM,
                   True, BLOCK_D != HEAD_DIM)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + off_bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(Delta + off_bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        full_hi = start_m
        edge_hi = tl.minimum(start_m + BLOCK_M, Lk)
    else:
        full_hi = (Lk // BLOCK_N) * BLOCK_N
        edge_hi = Lk
    for start_n in range(0, full_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d,
                      Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_ml, qk_scale,
                      HEAD_DIM, BLOCK_D, False, False, HAS_MASK, UPCAST, DOT_PREC)
    for start_n in range(full_hi, edge_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d,
                      Lk, stride_kn, stride_kd, stride_vn, stride_vd, stride_ml, qk_scale,
                      HEAD_DIM, BLOCK_D, True, CAUSAL, HAS_MASK, UPCAST, DOT_PREC)
    out_off = off_bh * Lq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_off, (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    # The interpreter has no SMs; pretend to have 4 so small tests exercise the split path.
    return 4 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _query_splits(lq: int, lk: int, batch_heads: int, causal: bool, device: torch.device) -> tuple[int, int]:
    """(splits, queries per split) for the dK/dV kernel.

    Its grid has one program per (key block, head): with few keys (cross-attention to 77 text tokens) that
    is far fewer programs than SMs, each looping over thousands of queries. Splitting the query range
    restores parallelism; chunks are multiples of 128 so every BLOCK_M tiles them exactly.
    """
    programs = triton.cdiv(lk, 64) * batch_heads
    splits = min(triton.cdiv(2 * _sm_count(device), programs), triton.cdiv(lq, 128))
    if causal or splits <= 1:
        return 1, lq
    chunk = triton.cdiv(triton.cdiv(lq, splits), 128) * 128
    return triton.cdiv(lq, chunk), chunk


def flash_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv), contiguous, shaped and typed like q, k, v. grad_out/out: (B, H, Lq, D);
    lse: (B, H, Lq) fp32 from ``flash_fwd``. Any input strides are accepted (stride-0 grad_out included)."""
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    block_d = padded_head_dim(head_dim)
    delta = torch.empty((batch, heads, lq), dtype=torch.float32, device=q.device)
    _bwd_delta_kernel[(triton.cdiv(lq, 64), batch * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, lq,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=64)
    dq = torch.empty((batch, heads, lq, head_dim), dtype=q.dtype, device=q.device)
    mask, stride_mb, stride_ml = mask_args(key_padding_mask, q)
    common = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), stride_mb, stride_ml,
              heads, lq, lk, scale, scale * LOG2E)
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal, HAS_MASK=key_padding_mask is not None,
                 UPCAST=INTERPRET, DOT_PREC=dot_precision(q.dtype))
    splits, chunk = _query_splits(lq, lk, batch * heads, causal, q.device)
    # One split writes dK/dV directly; several write fp32 partials summed in a fixed order (deterministic).
    part_dtype = k.dtype if splits == 1 else torch.float32
    dk, dv = (torch.empty((splits, batch, heads, lk, head_dim), dtype=part_dtype, device=q.device) for _ in "kv")
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), batch * heads, splits)](
        q, k, v, mask, grad_out, lse, delta, dk, dv, *common, chunk, **flags)
    dk, dv = (t[0] if splits == 1 else t.sum(0).to(k.dtype) for t in (dk, dv))
    _bwd_dq_kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), batch * heads)](
        q, k, v, mask, grad_out, lse, delta, dq, *common, **flags)
    return dq, dk, dv
