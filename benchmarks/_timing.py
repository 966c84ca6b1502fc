"""Shared timing for the GPU benchmarks (imported by sibling scripts run as `python benchmarks/NAME.py`)."""
from __future__ import annotations

import time
from typing import Callable


def median_ms_timer(smoke: bool) -> Callable[[Callable, list], float]:
    """A function (fn, grads_to_reset) -> median milliseconds of fn().

    On a GPU: triton.testing.do_bench (warm-up, CUDA-event timing, median). In CPU smoke mode (the interpreted
    kernels): the median of three wall-clock runs, enough to show the script works, meaningless as a speed.
    """
    if smoke:
        def wall(fn: Callable, grads: list) -> float:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return sorted(times)[1]
        return wall
    from triton.testing import do_bench
    return lambda fn, grads: do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")
