"""Reconstruction quality: PSNR and SSIM of images in [0, 1], per image (callers sum and count them).

SSIM follows Wang, Bovik, Sheikh and Simoncelli (2004), "Image quality assessment: from error visibility to
structural similarity": an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, dynamic range L = 1,
local statistics with population (not sample) covariance, the SSIM map over the *valid* positions only (no
padding, as the authors' reference code), averaged over positions and then over the three colour channels
(what scikit-image's ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
channel_axis=0, data_range=1)`` computes). Images smaller than 11 px use the largest odd window that fits.

PSNR = 10 log10(1 / MSE) per image. Identical images would give +inf, which no mean survives: the MSE is floored
at 1e-10, so a perfect reconstruction scores 100 dB.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
MIN_MSE = 1e-10  # -> at most 100 dB, so averages of PSNR stay finite


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of equal shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) in [0, 1] -> (B,) PSNR in dB (float32; computed in float64)."""
    _check(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(1.0 / mse.clamp(min=MIN_MSE))).float()


def gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian; the 2-D window is its outer product (separable)."""
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Valid 2-D Gaussian filtering of (N, 1, H, W) with the separable window `g` (k,): (N, 1, H-k+1, W-k+1)."""
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1))
    return F.conv2d(x, g.view(1, 1, 1, k))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, C, H, W) in [0, 1] -> (B,) mean SSIM per image (float32; computed in float64)."""
    _check(x, y)
    b, c, h, w = x.shape
    size = min(SSIM_WINDOW, h, w)
    size -= 1 - size % 2  # odd, as the window must have a centre
    g = gaussian_window(size, SSIM_SIGMA, torch.float64, x.device)
    x = x.double().reshape(b * c, 1, h, w)
    y = y.double().reshape(b * c, 1, h, w)
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    # E[x^2] - E[x]^2 with the normalised window: population (co)variances, as in the paper
    var_x = _filter(x * x, g) - mu_x ** 2
    var_y = _filter(y * y, g) - mu_y ** 2
    cov = _filter(x * y, g) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2  # data range L = 1
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)
    per_channel = (num / den).flatten(1).mean(dim=1)  # (B*C,)
    return per_channel.view(b, c).mean(dim=1).float()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any dtype) -> float32 in [0, 1], clamped (what a saved image would hold)."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def reconstruction_sums(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{"psnr": (sum, n), "ssim": (sum, n)} over a batch of (B, 3, H, W) images in [-1, 1]."""
    x, y = to_unit(original), to_unit(reconstruction)
    n = float(x.shape[0])
    return {"psnr": (float(psnr(x, y).sum()), n), "ssim": (float(ssim(x, y).sum()), n)}
