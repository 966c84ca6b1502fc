"""torch.compile with aspect-ratio buckets: the batch shape changes from step to step, and dynamo's automatic
dynamic shapes (PyTorch's default) turn height and width symbolic after they first change, so a bucketed run
compiles the U-Net a bounded number of times (3 here: static, dynamic height, dynamic width), not once per
step or per bucket. The graph is captured by dynamo and run eagerly (CompileCounter): recompiles are dynamo's
decision, whatever backend (inductor on GPU) then generates code."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from pipeline.data.buckets import bucket_shapes
from pipeline.models.unet import Conditioning, UNetConfig, build_unet, default_sizes, unet_forward


@pytest.mark.slow  # about 30 s of graph capture on a 2-core CPU
def test_bucketed_shapes_compile_a_bounded_number_of_times():
    torch._dynamo.reset()
    torch.manual_seed(0)
    cond = Conditioning(text_dim=8, pooled_text=True, size_dim=4)
    unet = build_unet(UNetConfig(channels=8, channel_mult=(1, 2), attention_resolutions=(8,), head_width=8,
                                 norm_groups=4), sample_size=16, in_channels=3, out_channels=3, cond=cond)
    counter = CompileCounter()
    unet.compile(backend=counter)
    shapes = bucket_shapes(16, 8, 32, 4)
    compiled = []
    with torch.no_grad():
        for h, w in (*shapes, *reversed(shapes)):
            inputs = {"text": torch.randn(2, 5, 8), "mask": torch.ones(2, 5, dtype=torch.bool),
                      "sizes": default_sizes(2, h, w)}
            out = unet_forward(unet, cond, torch.randn(2, 3, h, w), torch.tensor([3, 500]), inputs)
            assert out.shape == (2, 3, h, w)
            compiled.append(counter.frame_count)
    assert len(shapes) == 9 and compiled[-1] <= 3
    assert compiled[len(shapes) - 1] == compiled[-1]  # a second pass over every bucket compiles nothing
    torch._dynamo.reset()
