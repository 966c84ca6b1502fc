"""Fused GroupNorm(+scale/shift)+SiLU in diffusers' ResNet blocks (``model.unet.fused_norm``).

``install_fused_norm(unet, backend)`` replaces the forward of every ``diffusers ResnetBlock2D`` whose norms are
``nn.GroupNorm`` and whose activation is SiLU by the same computation with ``norm1 -> SiLU`` and
``norm2 -> (1 + scale) * x + shift -> SiLU`` each done by one call of
:func:`pipeline.models.attention.group_norm_silu` (the fused Triton kernel for backend 'triton', the PyTorch
reference otherwise). Only the forward changes: the parameters stay the block's own ``norm1``/``norm2`` modules,
so the state dict and every checkpoint are the same with or without it.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from pipeline.models.attention import check_backend, group_norm_silu


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, backend: str, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift, True, backend)


def _forward(self: nn.Module, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``ResnetBlock2D.forward`` (diffusers 0.42) with the two norm+SiLU pairs fused; shapes as there."""
    backend = self.t2i_fused_backend
    hidden = _norm_silu(self.norm1, input_tensor, backend)
    if self.upsample is not None:
        input_tensor, hidden = self.upsample(input_tensor), self.upsample(hidden)
    elif self.downsample is not None:
        input_tensor, hidden = self.downsample(input_tensor), self.downsample(hidden)
    hidden = self.conv1(hidden)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError("`temb` should not be None when `time_embedding_norm` is scale_shift")
        scale, shift = torch.chunk(temb, 2, dim=1)  # (B, C) each: the kernel broadcasts them itself
        hidden = _norm_silu(self.norm2, hidden, backend, scale, shift)
    else:
        if self.time_embedding_norm == "default" and temb is not None:
            hidden = hidden + temb[:, :, None, None]
        hidden = _norm_silu(self.norm2, hidden, backend)
    hidden = self.conv2(self.dropout(hidden))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    return (input_tensor + hidden) / self.output_scale_factor


def install_fused_norm(model: nn.Module, backend: str) -> int:
    """Fuse the norm+SiLU pairs of every eligible ResnetBlock2D of `model`; returns how many blocks."""
    from diffusers.models.resnet import ResnetBlock2D

    check_backend(backend)
    count = 0
    for module in model.modules():
        if (isinstance(module, ResnetBlock2D) and isinstance(module.norm1, nn.GroupNorm)
                and isinstance(module.norm2, nn.GroupNorm) and isinstance(module.nonlinearity, nn.SiLU)
                and module.time_embedding_norm in ("default", "scale_shift")):
            module.t2i_fused_backend = backend
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
