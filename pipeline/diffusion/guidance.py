"""Classifier-free guidance and x0 thresholding, applied by the sampling loop.

Shapes: x_t (N, C, H, W) (any trailing dims), t (N,), conditioning dicts {name: (N, ...)}; x0 (B, C, H, W).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]


def _batched_conditions(cond: Mapping[str, Tensor], uncond: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """{name: cat([cond[name], uncond[name]])} (2N, ...), after checking both sides describe N samples alike."""
    if set(cond) != set(uncond):
        raise ValueError(f"classifier-free guidance: conditional and unconditional inputs need the same keys, got "
                         f"{sorted(cond)} and {sorted(uncond)}")
    batched = {}
    for name in cond:
        c, u = cond[name], uncond[name]
        if c.shape[0] != n or c.shape != u.shape:
            raise ValueError(f"classifier-free guidance: '{name}' must have shape (N={n}, ...) on both sides, got "
                             f"{tuple(c.shape)} (conditional) and {tuple(u.shape)} (unconditional)")
        batched[name] = torch.cat([c, u], dim=0)
    return batched


def guidance_rescale(guided: Tensor, conditional: Tensor, rescale: float) -> Tensor:
    """Lin et al. 2023 (sec. 3.4): scale each sample of `guided` to the std of `conditional`, mix by `rescale`.

    Large guidance scales inflate the prediction's per-sample std (over-exposed images); matching the conditional
    prediction's std undoes that, and mixing with the plain guided result keeps some of its contrast.
    """
    dims = tuple(range(1, guided.dim()))
    std_guided = guided.std(dim=dims, keepdim=True)
    std_cond = conditional.std(dim=dims, keepdim=True)
    # a constant guided prediction has no spread to rescale: leave it as it is instead of dividing by zero
    ratio = torch.where(std_guided > 0, std_cond / std_guided, torch.ones_like(std_guided))
    return rescale * (guided * ratio) + (1 - rescale) * guided


def classifier_free(model_fn: ModelFn, x_t: Tensor, t: Tensor, cond: Mapping[str, Tensor],
                    uncond: Mapping[str, Tensor], scale: float, rescale: float = 0.0) -> Tensor:
    """Guided network output uncond + scale * (cond - uncond), in the model's own parameterisation.

    model_fn(x (M, ...), t (M,), conditions {name: (M, ...)}) -> (M, ...). With scale == 1 the guided output is
    the conditional one, so only the conditional half is evaluated; otherwise both halves run as ONE batch of 2N
    (one forward pass, one set of kernel launches). `rescale` in [0, 1] applies guidance rescale (0 = off).
    Returns float32 (or wider): the difference cond - uncond is multiplied by `scale` and 16-bit would amplify its
    rounding error.
    """
    if not scale >= 1.0:
        raise ValueError(f"guidance scale must be >= 1 (1 = no guidance), got {scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must be in [0, 1] (0 = off), got {rescale}")
    n = x_t.shape[0]
    if t.shape != (n,):
        raise ValueError(f"classifier-free guidance: t must have shape ({n},), got {tuple(t.shape)}")
    if scale == 1.0:
        out = model_fn(x_t, t, dict(cond))
        return out.to(torch.promote_types(out.dtype, torch.float32))
    conditions = _batched_conditions(cond, uncond, n)
    out = model_fn(torch.cat([x_t, x_t], dim=0), torch.cat([t, t], dim=0), conditions)
    dtype = torch.promote_types(out.dtype, torch.float32)
    conditional, unconditional = out[:n].to(dtype), out[n:].to(dtype)
    guided = unconditional + scale * (conditional - unconditional)
    if rescale > 0:
        guided = guidance_rescale(guided, conditional, rescale)
    return guided


def _row_quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row quantile (B,) of rows (B, N) with linear interpolation, as torch.quantile computes it.

    torch.quantile refuses inputs above 2**24 elements (a batch of eight 1024x1024 RGB images has 25M); two
    kthvalue selections have no such limit and need no full sort.
    """
    n = rows.shape[1]
    position = q * (n - 1)
    lo = int(position)
    hi = min(lo + 1, n - 1)
    low = rows.kthvalue(lo + 1, dim=1).values
    high = rows.kthvalue(hi + 1, dim=1).values if hi != lo else low
    return low + (position - lo) * (high - low)


def dynamic_threshold(x0: Tensor, percentile: float) -> Tensor:
    """Imagen's dynamic thresholding of predicted clean images x0 (B, ...) in [-1, 1] pixel units.

    Per sample s = max(1, quantile(|x0|, percentile)); x0 -> clamp(x0, -s, s) / s. Saturated pixels are pulled
    inwards instead of clipped, which keeps high guidance scales from producing flat over-saturated regions;
    samples already inside [-1, 1] (s = 1) are unchanged. Returns x0's dtype.
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic thresholding percentile must be in (0, 1], got {percentile}")
    flat = x0.detach().abs().reshape(x0.shape[0], -1).to(torch.promote_types(x0.dtype, torch.float32))
    s = _row_quantile(flat, percentile).clamp(min=1.0).reshape(-1, *([1] * (x0.dim() - 1)))
    x = x0.to(s.dtype)
    return (torch.maximum(torch.minimum(x, s), -s) / s).to(x0.dtype)


def static_threshold(x0: Tensor, limit: float = 1.0) -> Tensor:
    """Clamp x0 to [-limit, limit] (DDPM's "clip_sample"); the data range of pixel-space stages is [-1, 1]."""
    if not limit > 0:
        raise ValueError(f"static threshold limit must be > 0, got {limit}")
    return x0.clamp(-limit, limit)
