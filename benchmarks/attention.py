"""Attention throughput (TFLOP/s, forward and forward+backward) on U-Net and prior shapes.

    python benchmarks/attention.py              # needs CUDA; bf16; medians of triton.testing.do_bench
    python benchmarks/attention.py --cpu-smoke  # tiny shape through the Triton interpreter (checks the script)

Backends: our Triton kernel, SDPA restricted to its flash / memory-efficient kernels, SDPA with a boolean
mask as torch dispatches it (the `attention: sdpa` path), and xformers. FLOPs count 4*B*H*Lq*Lk*D for the
forward (halved for causal) and 3.5x that for forward+backward; padded keys are counted as work.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from _timing import median_ms_timer  # noqa: E402  (sibling module of this script)


@dataclass(frozen=True)
class Shape:
    """One benchmark case; text padding keeps a random 50-100% prefix of the keys per sample."""
    name: str
    batch: int
    heads: int
    lq: int
    lk: int
    head_dim: int = 64
    causal: bool = False
    masked: bool = False


SHAPES = [
    Shape("unet self 1024", 16, 8, 1024, 1024),
    Shape("unet self 4096", 4, 8, 4096, 4096),
    Shape("unet cross 4096x77", 4, 8, 4096, 77, masked=True),
    Shape("unet cross 4096x256", 4, 8, 4096, 256, masked=True),
    Shape("prior causal 128", 128, 16, 128, 128, causal=True),
    Shape("prior causal 256", 64, 16, 256, 256, causal=True),
]
SMOKE_SHAPES = [Shape("smoke cross 48x20", 1, 2, 48, 20, head_dim=32, masked=True)]


def _backends() -> dict[str, Callable]:
    """name -> fn(q, k, v, mask, causal) returning (B, H, Lq, D); a fn raises to mark itself n/a."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels
    from pipeline.models.attention import attend

    def sdpa_only(backend: SDPBackend, allow_mask: bool) -> Callable:
        def run(q, k, v, mask, causal):
            if mask is not None and not allow_mask:
                raise NotImplementedError("no mask support")
            attn_mask = None if mask is None else mask[:, None, None, :]
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return run

    return {
        "triton (ours)": lambda q, k, v, m, c: kernels.attention(q, k, v, key_padding_mask=m, causal=c),
        "sdpa flash": sdpa_only(SDPBackend.FLASH_ATTENTION, allow_mask=False),
        "sdpa efficient": sdpa_only(SDPBackend.EFFICIENT_ATTENTION, allow_mask=True),
        "sdpa dispatch": lambda q, k, v, m, c: attend(q, k, v, key_padding_mask=m, causal=c, backend="sdpa"),
        "xformers": lambda q, k, v, m, c: attend(q, k, v, key_padding_mask=m, causal=c, backend="xformers"),
    }


def _inputs(shape: Shape, device: str, dtype: torch.dtype) -> tuple:
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = [(shape.batch, shape.heads, n, shape.head_dim) for n in (shape.lq, shape.lk, shape.lk, shape.lq)]
    q, k, v, grad_out = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in sizes]
    mask = None
    if shape.masked:
        lengths = torch.randint(shape.lk // 2, shape.lk + 1, (shape.batch,), device=device, generator=gen)
        mask = torch.arange(shape.lk, device=device)[None, :] < lengths[:, None]
    return q, k, v, grad_out, mask


def _measure(fn: Callable, shape: Shape, device: str, dtype: torch.dtype, timer: Callable) -> tuple[str, str]:
    """(fwd TFLOP/s, fwd+bwd TFLOP/s) as table cells, or the reason it could not run."""
    q, k, v, grad_out, mask = _inputs(shape, device, dtype)
    flops = 4.0 * shape.batch * shape.heads * shape.lq * shape.lk * shape.head_dim * (0.5 if shape.causal else 1.0)
    try:
        with torch.no_grad():
            ms_fwd = timer(lambda: fn(q, k, v, mask, shape.causal), [])
        leaves = [t.requires_grad_() for t in (q, k, v)]
        ms_all = timer(lambda: fn(*leaves, mask, shape.causal).backward(grad_out), leaves)
    except Exception as err:  # noqa: BLE001 - a backend that cannot run this shape is reported, not fatal
        return (f"n/a ({type(err).__name__})",) * 2
    finally:
        del q, k, v, grad_out
    return f"{flops / ms_fwd * 1e-9:.3g}", f"{3.5 * flops / ms_all * 1e-9:.3g}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny fp32 shape through the Triton interpreter")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import kernels`
    elif not torch.cuda.is_available():
        print("benchmarks/attention.py: no CUDA device found, nothing measured (use --cpu-smoke to test the script)")
        return 0
    device, dtype = ("cpu", torch.float32) if args.cpu_smoke else ("cuda", torch.bfloat16)
    backends = _backends()
    if args.cpu_smoke:
        backends = {name: backends[name] for name in ("triton (ours)", "sdpa dispatch")}
    import triton
    dev_name = "CPU (Triton interpreter)" if args.cpu_smoke else torch.cuda.get_device_name()
    method = "median of 3 wall-clock runs" if args.cpu_smoke else "median of triton.testing.do_bench"
    print(f"# attention TFLOP/s, {dtype}, {dev_name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today()}; {method}; cells: fwd / fwd+bwd")
    print("| shape | B x H x Lq x Lk x D | " + " | ".join(backends) + " |")
    print("|---|---|" + "---|" * len(backends))
    timer = median_ms_timer(args.cpu_smoke)
    for shape in SMOKE_SHAPES if args.cpu_smoke else SHAPES:
        cells = [" / ".join(_measure(fn, shape, device, dtype, timer)) for fn in backends.values()]
        dims = f"{shape.batch}x{shape.heads}x{shape.lq}x{shape.lk}x{shape.head_dim}"
        print(f"| {shape.name} | {dims} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
