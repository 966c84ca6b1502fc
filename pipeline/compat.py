"""Make the declared dependencies importable on CPU-only torch, without touching GPU installs.

The torchvision wheel on the package registry is a CUDA build. With the CPU build of torch, its compiled
extension (``torchvision/_C.so``) cannot load, and ``import torchvision`` then fails while registering a fake
kernel for ``torchvision::nms`` ("operator torchvision::nms does not exist"). That breaks ``import open_clip``,
``transformers``' vision models and the ``accelerate`` CLI. Declaring the two operator schemas ourselves lets
torchvision's Python side (transforms, model definitions) import and work; its C++ ops stay unavailable, which
nothing in this project uses.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_fragment = None  # keeps the torch.library registration alive for the life of the process


def _torchvision_extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # not installed: nothing to fix
    for candidate in sorted(Path(spec.origin).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(candidate))
            return True
        except OSError:
            return False
    return False


def patch_torchvision_for_cpu_torch() -> bool:
    """Declare torchvision's operator schemas when torch is a CPU build and torchvision's extension can't load.

    Must run before torchvision is first imported. Returns True when the schemas were declared.
    """
    global _fragment
    import torch

    if "torchvision" in sys.modules or _fragment is not None:
        return False
    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        return False  # a GPU build of torch: torchvision's own extension is the right thing
    if hasattr(torch.ops.torchvision, "nms") or _torchvision_extension_loads():
        return False
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    return True


def quiet_xformers_on_cpu_torch() -> None:
    """On CPU torch, xformers (a CUDA-only wheel) warns at import that its extensions do not load; diffusers imports
    it, so every command would print that. Nothing on CPU uses xformers: keep only its errors there."""
    import logging

    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        logging.getLogger("xformers").setLevel(logging.ERROR)
