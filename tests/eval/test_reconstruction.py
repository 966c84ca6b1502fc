"""PSNR and SSIM (pipeline/eval/reconstruction.py) against closed forms and an independent float64 numpy SSIM."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.eval.reconstruction import psnr, reconstruction_sums, ssim


def _numpy_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. 2004 by the book, one (H, W) channel in [0, 1]: explicit 2-D Gaussian window over every valid
    position (no separable filtering, no torch), population statistics, mean of the SSIM map."""
    half = size // 2
    coords = np.arange(size) - half
    window = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma ** 2))
    window /= window.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (window * px).sum(), (window * py).sum()
            vx = (window * (px - mx) ** 2).sum()
            vy = (window * (py - my) ** 2).sum()
            cxy = (window * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_psnr_of_a_constant_offset_is_20_log10_of_its_inverse():
    x = torch.rand(3, 3, 16, 16) * 0.8
    for d in (0.1, 0.01, 0.05):
        assert torch.allclose(psnr(x, x + d), torch.full((3,), 20 * math.log10(1 / d)), atol=1e-4)
    assert torch.allclose(psnr(x, x), torch.full((3,), 100.0))  # identical: finite cap, averages stay finite


def test_psnr_is_per_image():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.01
    assert torch.allclose(psnr(x, y), torch.tensor([20.0, 40.0]), atol=1e-4)


def test_ssim_identical_is_one_and_matches_an_independent_float64_implementation():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 18, generator=gen)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    # a structured image and a few distortions (noise, blur-like average, contrast change, offset)
    ramp = torch.linspace(0, 1, 18).expand(20, 18)
    base = torch.stack([ramp, ramp.flip(1), (ramp > 0.5).float()])[None]
    cases = [(x, (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)),
             (base, (0.5 * base + 0.25)), (base, (base + 0.2).clamp(0, 1)),
             (base, torch.roll(base, 1, dims=3))]
    for a, b in cases:
        got = ssim(a, b)
        for n in range(a.shape[0]):
            want = np.mean([_numpy_ssim(a[n, c].double().numpy(), b[n, c].double().numpy()) for c in range(3)])
            assert abs(float(got[n]) - want) < 1e-5, (float(got[n]), want)


def test_ssim_drops_with_distortion_and_handles_tiny_images():
    x = torch.rand(1, 3, 32, 32)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert float(ssim(x, noisy)) < float(ssim(x, (x + 0.05 * torch.randn_like(x)).clamp(0, 1))) < 1.0
    small = torch.rand(2, 3, 6, 6)
    assert torch.allclose(ssim(small, small), torch.ones(2), atol=1e-6)  # window shrinks to 5x5


def test_reconstruction_sums_work_in_minus_one_to_one():
    x = torch.rand(4, 3, 16, 16) * 1.6 - 0.8
    sums = reconstruction_sums(x, x + 0.2)  # 0.2 in [-1, 1] = 0.1 in [0, 1]
    assert sums["psnr"][1] == 4 and sums["psnr"][0] / 4 == pytest.approx(20.0, abs=1e-3)
    assert sums["ssim"][0] / 4 < 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equal shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
