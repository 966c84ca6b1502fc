"""A distributed text-to-image training pipeline: CLIP, diffusion prior, latent autoencoder, U-Net cascade.

Importing the package makes open_clip, transformers and torchvision importable on CPU-only torch
(see :mod:`pipeline.compat`).
"""
from pipeline.compat import patch_torchvision_for_cpu_torch, quiet_xformers_on_cpu_torch

patch_torchvision_for_cpu_torch()
quiet_xformers_on_cpu_torch()

__version__ = "0.1.0"
