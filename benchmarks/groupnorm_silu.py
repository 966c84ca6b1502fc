"""Fused GroupNorm + scale/shift + SiLU: achieved GB/s vs PyTorch, on typical U-Net activations.

    python benchmarks/groupnorm_silu.py              # needs CUDA; bf16; medians of triton.testing.do_bench
    python benchmarks/groupnorm_silu.py --cpu-smoke  # tiny shape through the Triton interpreter

Bytes counted are the minimum traffic: forward reads x and writes y (2 tensors), forward+backward adds
reading x and dy and writing dx (5 tensors in all). "copy" is a device-to-device copy of x, the
practical bandwidth ceiling the percentages are relative to.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from _timing import median_ms_timer  # noqa: E402  (sibling module of this script)

SHAPES = [(8, 320, 64, 64), (8, 640, 32, 32), (8, 1280, 16, 16), (4, 128, 256, 256), (16, 320, 32, 32)]
SMOKE_SHAPES = [(2, 8, 12, 12)]
GROUPS = 32


def _torch_chain(groups: int) -> Callable:
    """What a U-Net ResBlock writes without a fused kernel: native GroupNorm, modulation, SiLU."""
    import torch.nn.functional as F

    def run(x, w, b, scale, shift):
        y = F.group_norm(x, groups, w, b)
        return F.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
    return run


def _measure(fn: Callable, shape: tuple, device: str, dtype: torch.dtype, timer: Callable) -> tuple[float, float]:
    """(fwd GB/s, fwd+bwd GB/s)."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, c = shape[:2]
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    w, bias = (torch.randn(c, device=device, generator=gen).to(dtype) for _ in range(2))
    scale, shift = (torch.randn(b, c, device=device, generator=gen).to(dtype) for _ in range(2))
    grad_y = torch.randn_like(x)
    nbytes = x.numel() * x.element_size()
    with torch.no_grad():
        ms_fwd = timer(lambda: fn(x, w, bias, scale, shift), [])
    leaves = [t.requires_grad_() for t in (x, w, bias, scale, shift)]
    ms_all = timer(lambda: fn(*leaves).backward(grad_y), leaves)
    return 2 * nbytes / ms_fwd * 1e-6, 5 * nbytes / ms_all * 1e-6


def _copy_gbps(shape: tuple, device: str, dtype: torch.dtype, timer: Callable) -> float:
    x = torch.randn(shape, device=device).to(dtype)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / timer(lambda: y.copy_(x), []) * 1e-6


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 shape through the Triton interpreter")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import kernels`
    elif not torch.cuda.is_available():
        print("benchmarks/groupnorm_silu.py: no CUDA device found, nothing measured "
              "(use --cpu-smoke to test the script)")
        return 0
    import triton

    import kernels
    device, dtype = ("cpu", torch.float32) if args.cpu_smoke else ("cuda", torch.bfloat16)
    groups = 4 if args.cpu_smoke else GROUPS
    fused = lambda x, w, b, sc, sh: kernels.group_norm_silu(x, w, b, groups, scale=sc, shift=sh)  # noqa: E731
    timer = median_ms_timer(args.cpu_smoke)
    dev_name = "CPU (Triton interpreter)" if args.cpu_smoke else torch.cuda.get_device_name()
    method = "median of 3 wall-clock runs" if args.cpu_smoke else "median of triton.testing.do_bench"
    print(f"# GroupNorm+scale/shift+SiLU GB/s, {dtype}, {dev_name}, torch {torch.__version__}, "
          f"triton {triton.__version__}, {datetime.date.today()}; {method}; groups={groups}")
    print("| shape | copy GB/s | fused fwd | torch fwd | fused fwd+bwd | torch fwd+bwd | fused fwd % of copy |")
    print("|---|---|---|---|---|---|---|")
    for shape in SMOKE_SHAPES if args.cpu_smoke else SHAPES:
        copy = _copy_gbps(shape, device, dtype, timer)
        f_fwd, f_all = _measure(fused, shape, device, dtype, timer)
        t_fwd, t_all = _measure(_torch_chain(groups), shape, device, dtype, timer)
        cells = " | ".join(f"{v:.3g}" for v in (copy, f_fwd, t_fwd, f_all, t_all))
        print(f"| {'x'.join(map(str, shape))} | {cells} | {100 * f_fwd / copy:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
