"""Small tensor helpers shared by the VP schedule (schedules.py) and the flow-matching path (flow.py).

Shapes: per-sample values (B,); data-shaped tensors (B, ...) with any number of trailing dims.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_range(values: Tensor, low: float, high: float, what: str) -> None:
    """Raise ValueError unless every value lies in [low, high].

    Only CPU tensors are checked: on an accelerator the check would block the host until the device catches up
    (a sync per call in the training step), and the values there come from our own draws.
    """
    if values.device.type != "cpu" or values.numel() == 0:
        return
    if bool(((values < low) | (values > high) | values.isnan()).any()):
        raise ValueError(f"{what} must lie in [{low:g}, {high:g}], got values from {values.min().item():g} to "
                         f"{values.max().item():g}")


def work_dtype(x: Tensor) -> torch.dtype:
    """float32 or wider: conversions divide by small coefficients (sqrt(abar) ~ 5e-5, sigma ~ 1e-3), too much for
    16-bit."""
    return torch.promote_types(x.dtype, torch.float32)


def coef(values: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like`, in `dtype` on like's device."""
    return values.to(device=like.device, dtype=dtype).reshape(-1, *([1] * (like.dim() - 1)))
