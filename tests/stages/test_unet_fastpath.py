"""The GPU fast path's switches work on CPU too: a compiled U-Net (graph capture through torch.compile's aot_eager
backend; inductor code generation takes minutes on CPU) with the fused AdamW trains like the eager one and resumes
from its checkpoints (whose keys do not change), within float tolerance."""
from __future__ import annotations

import pytest
import torch

from train_helpers import read_metrics, train_inprocess, weights
from unet_helpers import unet_config

pytestmark = pytest.mark.slow

FAST = {"compile": "on", "compile_backend": "aot_eager"}


def test_compiled_fused_unet_trains_and_resumes_like_eager(shards, tmp_path):
    common = {"max_steps": 4, "sample_every": 0}
    eager = unet_config(shards, train=common, eval={"every_steps": 0}, ckpt={"every_steps": 2})
    fast = unet_config(shards, train={**common, **FAST}, optim={"lr": 1e-3, "fused": "on"}, eval={"every_steps": 0},
                       ckpt={"every_steps": 2})
    assert train_inprocess(eager, tmp_path / "eager") == 0
    fast_half = {**fast, "train": {**fast["train"], "max_steps": 2}}
    assert train_inprocess(fast_half, tmp_path / "fast") == 0  # stops at step 2 ...
    assert train_inprocess(fast, tmp_path / "fast") == 0  # ... and resumes to step 4 from its checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / "fast")] == [1, 2, 3, 4]
    a, b = weights(tmp_path / "eager")["unet"], weights(tmp_path / "fast")["unet"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-5, rtol=1e-4, msg=key)
    losses = [(x["loss"], y["loss"]) for x, y in zip(read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "fast"))]
    assert all(abs(x - y) < 1e-4 for x, y in losses), losses
