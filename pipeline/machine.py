"""What machine a figure was measured on: printed beside every time the demo and the benchmarks report, because
machines of one kind differ (the demo's networks ran ~1.9x slower on an AMD EPYC than on an Intel Xeon with AMX)."""
from __future__ import annotations

import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo (and lscpu) gives it, e.g. 'AMD EPYC 9B14'; the platform's processor
    string where there is no /proc."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: torch.device | None = None) -> str:
    """'NVIDIA H200' for a CUDA device, else 'AMD EPYC ... (2 cores)'."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores)"
