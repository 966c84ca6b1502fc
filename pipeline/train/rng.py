"""Seeding and RNG state capture/restore in a form ``torch.load(weights_only=True)`` accepts.

Python's and numpy's Mersenne-Twister states are converted to int64 tensors and plain numbers (no numpy
arrays or pickled objects), so loading a checkpoint never needs to unpickle arbitrary classes.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed python `random`, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed per rank for per-rank randomness (noise, dropout) after model init."""
    return (seed * 1_000_003 + rank * 7919 + 1) % 2**63


def capture() -> dict[str, Any]:
    """The RNG states of this process: python, numpy, torch CPU and (if present) the current CUDA device."""
    version, mt, gauss = random.getstate()
    key, np_mt, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"key": str(key), "state": torch.from_numpy(np.asarray(np_mt, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        # Only the current device: the one this rank computes on (a node may show several GPUs to each process).
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }


def restore(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["key"], nps["state"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


@contextmanager
def isolated() -> Iterator[None]:
    """Run a block (data loading, evaluation, sampling) without disturbing the training RNG streams: whatever it
    draws is undone afterwards, so whether or when it runs never changes training (a resumed run neither repeats
    the evaluation of its resume step nor creates its data iterator at the same point of the streams)."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
