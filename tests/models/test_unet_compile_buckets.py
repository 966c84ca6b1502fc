"""torch.compile with aspect-ratio buckets: the batch shape changes from step to step, and dynamo's automatic
dynamic shapes (PyTorch's default) turn height and width symbolic after they first change, so a bucketed run
compiles the U-Net a bounded number of times (3 here: static, dynamic height, dynamic width), not once per
step or per bucket; with `dynamic_size` (train.compile_shapes: dynamic, the default with buckets) height and width
are symbolic from the first call and only the first shape compiles. The graph is captured by dynamo and run eagerly
(CompileCounter): recompiles are dynamo's decision, whatever backend (inductor on GPU) then generates code."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from pipeline.data.buckets import bucket_shapes
from pipeline.models.unet import Conditioning, UNetConfig, build_unet, default_sizes, unet_forward


def compile_counts(dynamic_size: bool) -> tuple[list[int], int]:
    """Frames compiled after each call over every bucket shape and back, and the number of shapes."""
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
            # padded text: the attention mask takes the path that reads its values
            mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
            inputs = {"text": torch.randn(2, 5, 8), "mask": mask, "sizes": default_sizes(2, h, w)}
            out = unet_forward(unet, cond, torch.randn(2, 3, h, w), torch.tensor([3, 500]), inputs,
                               dynamic_size=dynamic_size)
            assert out.shape == (2, 3, h, w)
            compiled.append(counter.frame_count)
    torch._dynamo.reset()
    return compiled, len(shapes)


@pytest.mark.slow  # about 30 s of graph capture on a 2-core CPU
def test_bucketed_shapes_compile_a_bounded_number_of_times():
    compiled, shapes = compile_counts(dynamic_size=False)
    assert shapes == 9 and compiled[-1] <= 3
    assert compiled[shapes - 1] == compiled[-1]  # a second pass over every bucket compiles nothing


@pytest.mark.slow
def test_dynamic_size_compiles_only_the_first_shape():
    compiled, shapes = compile_counts(dynamic_size=True)
    assert shapes == 9 and compiled[0] >= 1
    assert compiled[-1] == compiled[0]  # every later bucket shape reuses the first graph(s)
