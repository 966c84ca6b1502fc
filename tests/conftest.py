"""Test-wide setup.

TRITON_INTERPRET must be in the environment before any ``@triton.jit`` decorator runs, otherwise kernel
launches on a machine without a GPU fail with "0 active drivers". Setting it here, before pytest imports any
test module, makes the real Triton kernels run through the interpreter on CPU tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test modules import open_clip/torchvision directly; the package import applies the CPU-torch compatibility
# fix (pipeline.compat) first, as every entry point of the project does.
import pipeline  # noqa: E402,F401
