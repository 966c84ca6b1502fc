"""Inception-v3 pool features the way published FID/KID numbers are computed: torch-fidelity's port of the
TensorFlow Inception graph (``FeatureExtractorInceptionV3``, the network torchmetrics' FID also runs), its 2048-d
pool features, weights read from a local file (``eval.inception_weights``) since no machine here downloads them.

Images reach it as clean-fid prepares them: uint8 pixels, resized to 299 x 299 per channel in float with PIL's
bicubic filter (clean-fid's "clean" resize, free of the aliasing of a tensor bilinear resize), then rounded back
to uint8 because the extractor takes uint8 (clean-fid feeds the float image; the rounding moves a pixel by at most
half a level).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from pipeline.errors import ConfigError

INCEPTION_SIDE = 299
FEATURE = "2048"
WEIGHTS_HELP = ("the torch-fidelity Inception file weights-inception-2015-12-05-6726825d.pth (see README: "
                "Evaluation)")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, side, side): each channel resized as a float image with PIL bicubic,
    clipped to [0, 255] and rounded (clean-fid's resize). Unchanged when already side x side."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[-2:] == (side, side):
        return images
    array = images.cpu().numpy().astype(np.float32)
    out = np.empty((array.shape[0], 3, side, side), dtype=np.float32)
    for i, image in enumerate(array):
        for c in range(3):
            resized = Image.fromarray(image[c], mode="F").resize((side, side), resample=Image.BICUBIC)
            out[i, c] = np.asarray(resized)
    return torch.from_numpy(np.rint(out.clip(0, 255)).astype(np.uint8))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images (N, 3, H, W) in [0, 1] -> uint8 as saving them to PNG would; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


class InceptionFeatures:
    """The loaded extractor and the sha256 of its weights file (recorded with reference statistics)."""

    def __init__(self, network: FeatureExtractorInceptionV3, digest: str) -> None:
        self.network = network
        self.digest = digest
        self.dim = int(FEATURE)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """images (N, 3, H, W), float in [0, 1] or uint8 -> (N, 2048) float64 pool features."""
        device = next(self.network.parameters()).device
        out = []
        for chunk in to_uint8(images).split(batch_size):
            (features,) = self.network(clean_resize(chunk, INCEPTION_SIDE).to(device))
            out.append(features.to("cpu", torch.float64))
        return torch.cat(out) if out else torch.zeros(0, self.dim, dtype=torch.float64)

    def to(self, device: str | torch.device) -> InceptionFeatures:
        self.network.to(device)
        return self


def load_inception(path: str | Path, key: str = "eval.inception_weights") -> InceptionFeatures:
    """The TF-Inception feature extractor with the weights in `path`; ConfigError (one line naming `key`) when the
    path is empty, missing, not a tensor file, or holds another network's weights."""
    if not str(path):
        raise ConfigError(f"{key} is not set: point it at {WEIGHTS_HELP}")
    if not Path(path).is_file():
        raise ConfigError(f"{key}: {path} does not exist; it must be {WEIGHTS_HELP}")
    try:  # a tensors-only load first: the library's own load below unpickles arbitrary objects
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"{key}: {path} is not a PyTorch weights file ({type(exc).__name__}); it must be "
                          f"{WEIGHTS_HELP}") from None
    try:
        network = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE],
                                              feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError, AttributeError, TypeError) as exc:  # strict load_state_dict: wrong keys/shapes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}: {path} does not hold TF-Inception-v3 weights ({first}); it must be "
                          f"{WEIGHTS_HELP}") from None
    return InceptionFeatures(network.eval(), file_sha256(path))
