"""Kernel-test setup: the ``gpu`` marker (tests at realistic sizes that need CUDA).

TRITON_INTERPRET is set by tests/conftest.py before ``kernels`` is imported, so on a machine without a
GPU the real Triton kernels run through the interpreter on CPU tensors.
"""
import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
