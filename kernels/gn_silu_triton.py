"""Fused GroupNorm (+ per-(batch, channel) scale/shift) (+ SiLU) Triton kernels, forward and backward.

y = act(gn(x) * (1 + scale) + shift), gn(x) = (x - mean_g) * rstd_g * weight + bias, act = SiLU or identity.

x is viewed as a contiguous (B, C, S) tensor, so one group of one sample is a contiguous run of
(C / G) * S elements. One program handles one (sample, group): pass 1 reduces over the group, pass 2
writes the result. Pass 2 walks the group backwards so that it first re-reads the data pass 1 read last,
which is still in L2; the aim is DRAM traffic close to the minimum of 2 tensor passes forward (x in, y out)
and 3 backward (x, dy in, dx out), although pass 2 reads its inputs a second time (from L2, ideally).
Tiles are (BLOCK_C channels, BLOCK_S positions) so per-channel factors are vectors loaded once per
channel chunk, never per element.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels._runtime import pick_configs


def _tile_shape(args: dict) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S) with about TILE elements: contiguous positions first, then more channels."""
    block_s = min(triton.next_power_of_2(args["S"]), args["TILE"])
    block_c = min(triton.next_power_of_2(args["CPG"]), max(1, args["TILE"] // block_s))
    return block_c, block_s


_HEURISTICS = {"BLOCK_C": lambda a: _tile_shape(a)[0], "BLOCK_S": lambda a: _tile_shape(a)[1]}
GN_GPU_CONFIGS = [triton.Config({"TILE": t}, num_warps=w)
                  for t, w in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)]]
# Interpreter: a tiny tile so small test shapes still take several channel chunks and position tiles.
_CONFIGS = pick_configs(GN_GPU_CONFIGS, triton.Config({"TILE": 64}, num_warps=4))


@triton.jit
def _channel_factors(W, Bias, Scale, Shift, b, ch, cmask, C, mean, rstd, BLOCK_C: tl.constexpr,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                     HAS_SHIFT: tl.constexpr):
    """Per-channel vectors (BLOCK_C,): u = x * a + d is the pre-activation, gw = weight * (1 + scale)."""
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    bias = tl.zeros([BLOCK_C], tl.float32)
    gain = tl.full([BLOCK_C], 1.0, tl.float32)
    shift = tl.zeros([BLOCK_C], tl.float32)
    if HAS_W:
        w = tl.load(W + ch, mask=cmask, other=1.0).to(tl.float32)
    if HAS_B:
        bias = tl.load(Bias + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        gain += tl.load(Scale + b * C + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        shift = tl.load(Shift + b * C + ch, mask=cmask, other=0.0).to(tl.float32)
    gw = w * gain
    a = rstd * gw
    d = bias * gain + shift - mean * a
    return a, d, gw


@triton.jit
def _act(u, APPLY_SILU: tl.constexpr):
    """SiLU or identity."""
    if APPLY_SILU:
        u = u * tl.sigmoid(u)
    return u


@triton.jit
def _group_stats(x_base, CPG, S, eps, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Mean and 1/std of one group (CPG * S contiguous elements).

    Every lane of the tile runs its own Welford update (no cross-warp reduction inside the loop, so loads
    stream back to back); lanes are merged once at the end with Chan's formula. Robust when |mean| >> std,
    unlike a sum of squares.
    """
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    count = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    mean = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        for s0 in range(0, S, BLOCK_S):
            cs = c0 + offs_c
            ss = s0 + offs_s
            valid = (cs[:, None] < CPG) & (ss[None, :] < S)
            x = tl.load(x_base + cs[:, None] * S + ss[None, :], mask=valid, other=0.0).to(tl.float32)
            weight = valid.to(tl.float32)  # 0 leaves a lane's state unchanged
            count += weight
            delta = x - mean
            mean += weight * delta / tl.maximum(count, 1.0)
            m2 += weight * delta * (x - mean)
    total = tl.sum(tl.sum(count, axis=1), axis=0)
    group_mean = tl.sum(tl.sum(count * mean, axis=1), axis=0) / total
    spread = mean - group_mean
    group_m2 = tl.sum(tl.sum(m2 + count * spread * spread, axis=1), axis=0)
    return group_mean, 1.0 / tl.sqrt(group_m2 / total + eps)


@triton.autotune(configs=_CONFIGS, key=["CPG", "S"])
@triton.heuristics(_HEURISTICS)
@triton.jit
def _gn_fwd_kernel(X, Y, W, Bias, Scale, Shift, Mean, Rstd, C, S, G, CPG, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   APPLY_SILU: tl.constexpr, TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (B*G,). X/Y: contiguous (B, C, S); Mean/Rstd: (B, G) fp32 (saved for the backward)."""
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    base = pid.to(tl.int64) * CPG * S
    mean, rstd = _group_stats(X + base, CPG, S, eps, BLOCK_C, BLOCK_S)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    n_c = tl.cdiv(CPG, BLOCK_C)
    n_s = tl.cdiv(S, BLOCK_S)
    for ic in range(0, n_c):
        cs = (n_c - 1 - ic) * BLOCK_C + offs_c  # reversed walk: L2 still holds the group's tail
        cmask = cs < CPG
        a, d, gw = _channel_factors(W, Bias, Scale, Shift, b, g * CPG + cs, cmask, C, mean, rstd, BLOCK_C,
                                    HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        for i_s in range(0, n_s):
            ss = (n_s - 1 - i_s) * BLOCK_S + offs_s
            valid = cmask[:, None] & (ss[None, :] < S)
            offs = base + cs[:, None] * S + ss[None, :]
            x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
            y = _act(x * a[:, None] + d[:, None], APPLY_SILU)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _bwd_tile(X, DY, offs, valid, a, d, mean, rstd, APPLY_SILU: tl.constexpr):
    """Recompute one tile: (du, xhat), du = dL/d(pre-activation) (0 where invalid)."""
    x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=valid, other=0.0).to(tl.float32)
    du = dy
    if APPLY_SILU:
        u = x * a[:, None] + d[:, None]
        sig = tl.sigmoid(u)
        du = dy * sig * (1.0 + u * (1.0 - sig))
    return du, (x - mean) * rstd


@triton.autotune(configs=_CONFIGS, key=["CPG", "S"])
@triton.heuristics(_HEURISTICS)
@triton.jit
def _gn_bwd_kernel(X, DY, DX, W, Bias, Scale, Shift, Mean, Rstd, SumDu, SumDuXhat, C, S, G, CPG,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   APPLY_SILU: tl.constexpr, TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (B*G,). Writes DX (B, C, S) and the per-(b, c) sums SumDu = sum_s du, SumDuXhat = sum_s du*xhat
    (fp32 (B, C)), from which the host derives the weight/bias/scale/shift gradients.

    With gw = weight * (1 + scale): dxhat = du * gw and
    dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)).
    """
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    base = pid.to(tl.int64) * CPG * S
    mean = tl.load(Mean + pid)
    rstd = tl.load(Rstd + pid)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    n_c = tl.cdiv(CPG, BLOCK_C)
    n_s = tl.cdiv(S, BLOCK_S)
    sum_dxhat = 0.0
    sum_dxhat_xhat = 0.0
    for ic in range(0, n_c):
        cs = ic * BLOCK_C + offs_c
        cmask = cs < CPG
        a, d, gw = _channel_factors(W, Bias, Scale, Shift, b, g * CPG + cs, cmask, C, mean, rstd, BLOCK_C,
                                    HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        # Per-lane partial sums, reduced once per channel chunk rather than once per tile.
        lanes_du = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        lanes_du_xhat = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
        for i_s in range(0, n_s):
            ss = i_s * BLOCK_S + offs_s
            valid = cmask[:, None] & (ss[None, :] < S)
            du, xhat = _bwd_tile(X, DY, base + cs[:, None] * S + ss[None, :], valid, a, d, mean, rstd, APPLY_SILU)
            lanes_du += du
            lanes_du_xhat += du * xhat
        acc_du = tl.sum(lanes_du, axis=1)
        acc_du_xhat = tl.sum(lanes_du_xhat, axis=1)
        tl.store(SumDu + b * C + g * CPG + cs, acc_du, mask=cmask)
        tl.store(SumDuXhat + b * C + g * CPG + cs, acc_du_xhat, mask=cmask)
        sum_dxhat += tl.sum(tl.where(cmask, gw * acc_du, 0.0), axis=0)
        sum_dxhat_xhat += tl.sum(tl.where(cmask, gw * acc_du_xhat, 0.0), axis=0)
    inv_n = 1.0 / (CPG * S * 1.0)  # * 1.0: CPG and S may both be specialized constexpr 1
    c1 = sum_dxhat * inv_n
    c2 = sum_dxhat_xhat * inv_n
    for ic in range(0, n_c):
        cs = (n_c - 1 - ic) * BLOCK_C + offs_c
        cmask = cs < CPG
        a, d, gw = _channel_factors(W, Bias, Scale, Shift, b, g * CPG + cs, cmask, C, mean, rstd, BLOCK_C,
                                    HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        for i_s in range(0, n_s):
            ss = (n_s - 1 - i_s) * BLOCK_S + offs_s
            valid = cmask[:, None] & (ss[None, :] < S)
            offs = base + cs[:, None] * S + ss[None, :]
            du, xhat = _bwd_tile(X, DY, offs, valid, a, d, mean, rstd, APPLY_SILU)
            dx = rstd * (du * gw[:, None] - c1 - xhat * c2)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=valid)
