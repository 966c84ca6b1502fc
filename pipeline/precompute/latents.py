"""The ``latents:AE_DIR`` precompute encoder: an autoencoder's scaled latents of every image (see
pipeline/precompute/encoders.py for the encoder protocol and registry)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.precomputed_index import CROP_ARRAY
from pipeline.data.spec import SampleSpec
from pipeline.data.transforms import Crop
from pipeline.errors import DataError, UsageError
from pipeline.precompute.encoders import ArraySpec, EncoderContext
from pipeline.stages.autoencoder import load_codec


class LatentArrays:
    """``latents:AE_DIR[:RES][:std]`` -> "latent" float16 (C, RES/f, RES/f): the autoencoder's scaled deterministic
    latent (KL posterior mean, VQ pre-quantisation latent; ``(z - shift_factor) * scaling_factor``, unit variance),
    and with ``:std`` also "latent_std" float16 (C, RES/f, RES/f), the scaled KL posterior std (zeros for VQ), so a
    consumer can draw ``latent + latent_std * eps``. AE_DIR: an exported autoencoder folder or an autoencoder run
    dir; RES: image side (default: the autoencoder's training resolution). Images: center crop at RES, in [-1, 1].

    With --buckets-config RUN.yaml (ctx.buckets): each image is placed in its bucket of that config's data.buckets
    at data.resolution and centre-cropped exactly as the training loader does (RES, if given, must equal
    data.resolution); "latent" (and "latent_std") are then (C, H/f, W/f) of the image's bucket H x W, and
    CROP_ARRAY int64 (6,) records the crop (orig height/width, crop top/left, bucket height/width).
    """

    name = "latents"
    needs_caption = False

    def __init__(self, directory: str, resolution: int | None, with_std: bool, ctx: EncoderContext) -> None:
        self.directory, self.with_std = directory, with_std
        key = ("autoencoder", str(Path(directory).resolve()))
        if key not in ctx.cache:
            ctx.cache[key] = load_codec(directory).to(ctx.device)
        self.codec = ctx.cache[key]
        self.options = ctx.buckets
        factor = self.codec.factor
        if self.options is not None and resolution not in (None, self.options.size):
            raise UsageError(f"--encoder latents:{directory}:{resolution}: with --buckets-config the image size is "
                             f"that config's data.resolution ({self.options.size}); drop :{resolution}")
        size = self.options.size if self.options is not None else resolution or self.codec.resolution
        buckets = self.options.buckets if self.options is not None else ((size, size),)
        odd = [f"{h}x{w}" for h, w in buckets if h % factor or w % factor]
        if odd:
            raise UsageError(f"--encoder latents:{directory}: image shape {odd[0]} is not divisible by the "
                             f"autoencoder's downsampling factor {factor}")
        self.input = SampleSpec(image_size=size, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
        self.buckets = buckets if self.options is not None else ()
        side = None if self.buckets else size // factor
        self.shape = (self.codec.latent_channels, side, side)

    @classmethod
    def from_arg(cls, arg: str, ctx: EncoderContext) -> LatentArrays:
        path, resolution, with_std = arg, None, False
        while True:  # trailing ":std" / ":RES" options, in any order (the path itself may hold ':')
            head, sep, tail = path.rpartition(":")
            if sep and tail == "std" and not with_std:
                path, with_std = head, True
            elif sep and tail.isdigit() and resolution is None:
                path, resolution = head, int(tail)
            else:
                break
        if not Path(path).exists():
            raise UsageError(f"--encoder latents:{arg}: {path} does not exist (an exported autoencoder folder or "
                             f"an autoencoder run dir)")
        return cls(path, resolution, with_std, ctx)

    def arrays(self) -> dict[str, ArraySpec]:
        arrays = {"latent": ArraySpec("float16", self.shape, self.buckets)}
        if self.with_std:
            arrays["latent_std"] = ArraySpec("float16", self.shape, self.buckets)
        if self.buckets:
            arrays[CROP_ARRAY] = ArraySpec("int64", (6,))
        return arrays

    def encode(self, captions: list[str] | None, images: torch.Tensor | None,
               crops: list[Crop] | None = None) -> dict[str, np.ndarray]:
        """images float32 (B, 3, H, W) in [-1, 1], one shape -> {"latent": (B, C, H/f, W/f) float16, ...};
        crops (per-bucket mode): where each image came from, stored as CROP_ARRAY (B, 6) int64."""
        assert images is not None
        mean, std = self.codec.latent_distribution(images.to(next(self.codec.parameters()).dtype))
        out = {"latent": mean.float().to(torch.float16).cpu().numpy()}
        if self.with_std:
            out["latent_std"] = std.float().to(torch.float16).cpu().numpy()
        if self.buckets:
            assert crops is not None and len(crops) == images.shape[0]
            out[CROP_ARRAY] = np.array([[c.orig_height, c.orig_width, c.crop_top, c.crop_left, c.height, c.width]
                                        for c in crops], dtype=np.int64)
        for name, array in out.items():
            if not np.isfinite(array).all():  # scaled latents have unit variance; overflow means a broken model
                raise DataError(f"latents of {self.directory} overflow float16 in array {name!r} for an image in "
                                f"this batch: is the autoencoder's scaling_factor right?")
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.codec.kind, "image_size": self.input.image_size,
                "latent_shape": list(self.shape), "scaling_factor": self.codec.scale,
                "shift_factor": self.codec.shift, "with_std": self.with_std, "crop": "center",
                "mean": list(self.input.image_mean), "std": list(self.input.image_std),
                **({"buckets": [list(b) for b in self.buckets], "min_image_size": self.options.min_image_size,
                    "max_aspect_ratio": self.options.max_aspect_ratio} if self.options is not None else {})}
