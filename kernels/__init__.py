"""Triton kernels registered as torch custom ops, plus their plain-PyTorch references.

- ``attention(q, k, v, key_padding_mask=None, causal=False, scale=None)``: flash attention fwd+bwd
  (ops ``t2i_kernels::flash_attn_fwd`` / ``t2i_kernels::flash_attn_bwd``).
- ``group_norm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, apply_silu=True)``:
  fused GroupNorm + scale/shift + SiLU fwd+bwd (ops ``t2i_kernels::group_norm_silu_fwd`` / ``_bwd``).
- ``reference``: the same two functions in plain PyTorch (always available, the test oracle).

The Triton kernels need CUDA tensors. On a machine without a GPU they run only through the Triton
interpreter, which must be enabled (TRITON_INTERPRET=1) before this package is first imported.
``reference`` does not need Triton; the kernel entry points raise ImportError when Triton is missing.
"""
from __future__ import annotations

from typing import Any

from kernels import reference

try:
    import triton  # noqa: F401  (probe only)
except ImportError:  # pragma: no cover - Triton ships with CUDA torch; CPU installs may lack it
    HAS_TRITON = False
else:
    HAS_TRITON = True
    from kernels.attention_op import attention
    from kernels.groupnorm_op import group_norm_silu

__all__ = ["HAS_TRITON", "attention", "group_norm_silu", "reference"]


def __getattr__(name: str) -> Any:
    if name in ("attention", "group_norm_silu"):
        raise ImportError(f"kernels.{name} needs the `triton` package (pip install triton); "
                          "use the reference path (attention: sdpa) instead")
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
