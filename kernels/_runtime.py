"""Shared runtime facts for the Triton kernels: interpreter mode, device checks, autotune helpers."""
from __future__ import annotations

import math
import os

import torch
import triton

# Read once at import: ``@triton.jit`` itself only honours TRITON_INTERPRET at decoration time, so a later
# change of the variable could not switch the kernels anyway.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E: float = math.log2(math.e)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def require_kernel_device(t: torch.Tensor, op_name: str) -> None:
    """Raise a clear error when a Triton kernel cannot run on ``t``'s device.

    Triton kernels need CUDA tensors; on CPU they only run through the interpreter (TRITON_INTERPRET=1 set
    before ``kernels`` is imported), which is slow and meant for tests.
    """
    if t.is_cuda or INTERPRET:
        return
    raise RuntimeError(
        f"{op_name}: the Triton kernel needs CUDA tensors, got a tensor on '{t.device}'. Use the reference path "
        "(config `attention: sdpa`) on CPU, or set TRITON_INTERPRET=1 before importing `kernels` to run the "
        "kernel through the (slow) Triton interpreter."
    )


def pick_configs(gpu: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """Autotune over ``gpu`` configs on a device, but use the single ``interpreted`` config in the interpreter.

    With one config the autotuner never benchmarks, which keeps interpreted tests fast.
    """
    return [interpreted] if INTERPRET else gpu


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs get exact IEEE products (TF32 would lose ~3 digits),
    16-bit inputs ignore the setting and run native tensor-core dots."""
    return "ieee" if dtype == torch.float32 else "tf32"


def padded_head_dim(head_dim: int) -> int:
    """Register tile width for a head dim: the next power of two, at least 16 (the smallest ``tl.dot`` K)."""
    return max(16, triton.next_power_of_2(head_dim))
