"""model.unet.fused_norm: the fused GroupNorm(+scale/shift)+SiLU forward of diffusers' ResNet blocks computes what
diffusers' own forward does (outputs and gradients; PyTorch reference and the Triton kernel through the
interpreter), and the state dict does not change."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models.fused_norm import install_fused_norm
from pipeline.models.unet import Conditioning, UNetConfig, build_unet, unet_forward

COND = Conditioning(12, True)


def _unet(scale_shift: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = UNetConfig(channels=8, channel_mult=(1, 2), attention_resolutions=(), head_width=8, norm_groups=4,
                     scale_shift_norm=scale_shift)
    return build_unet(cfg, sample_size=8, in_channels=3, out_channels=3, cond=COND)


def _run(unet: torch.nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
    inputs = {"text": torch.randn(2, 5, 12, generator=gen), "mask": torch.ones(2, 5, dtype=torch.bool)}
    out = unet_forward(unet, COND, x, torch.tensor([10.0, 700.0]), inputs)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.detach(), x.grad, *(p.grad for p in unet.parameters())]


@pytest.mark.parametrize("scale_shift", [True, False], ids=["scale_shift", "default"])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_fused_resnet_blocks_equal_diffusers(scale_shift, backend):
    plain = _unet(scale_shift)
    fused = copy.deepcopy(plain)
    assert install_fused_norm(fused, backend) == len([m for m in plain.modules()
                                                      if type(m).__name__ == "ResnetBlock2D"]) > 0
    assert plain.state_dict().keys() == fused.state_dict().keys()
    for a, b in zip(_run(plain), _run(fused)):
        torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)
