"""The ``latents:AE_DIR`` precompute encoder: an autoencoder's scaled latents of every image (see
pipeline/precompute/encoders.py for the encoder protocol and registry)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.spec import SampleSpec
from pipeline.errors import DataError, UsageError
from pipeline.precompute.encoders import ArraySpec, EncoderContext
from pipeline.stages.autoencoder import load_codec


class LatentArrays:
    """``latents:AE_DIR[:RES][:std]`` -> "latent" float16 (C, RES/f, RES/f): the autoencoder's scaled deterministic
    latent (KL posterior mean, VQ pre-quantisation latent; ``(z - shift_factor) * scaling_factor``, unit variance),
    and with ``:std`` also "latent_std" float16 (C, RES/f, RES/f), the scaled KL posterior std (zeros for VQ), so a
    consumer can draw ``latent + latent_std * eps``. AE_DIR: an exported autoencoder folder or an autoencoder run
    dir; RES: image side (default: the autoencoder's training resolution). Images: center crop at RES, in [-1, 1].
    """

    name = "latents"
    needs_caption = False

    def __init__(self, directory: str, resolution: int | None, with_std: bool, ctx: EncoderContext) -> None:
        self.directory, self.with_std = directory, with_std
        key = ("autoencoder", str(Path(directory).resolve()))
        if key not in ctx.cache:
            ctx.cache[key] = load_codec(directory).to(ctx.device)
        self.codec = ctx.cache[key]
        size = resolution or self.codec.resolution
        if size % self.codec.factor:
            raise UsageError(f"--encoder latents:{directory}: resolution {size} is not divisible by the "
                             f"autoencoder's downsampling factor {self.codec.factor}")
        self.input = SampleSpec(image_size=size, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
        self.shape = (self.codec.latent_channels, size // self.codec.factor, size // self.codec.factor)

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
        arrays = {"latent": ArraySpec("float16", self.shape)}
        if self.with_std:
            arrays["latent_std"] = ArraySpec("float16", self.shape)
        return arrays

    def encode(self, captions: list[str] | None, images: torch.Tensor | None) -> dict[str, np.ndarray]:
        assert images is not None
        mean, std = self.codec.latent_distribution(images.to(next(self.codec.parameters()).dtype))
        out = {"latent": mean.float().to(torch.float16).cpu().numpy()}
        if self.with_std:
            out["latent_std"] = std.float().to(torch.float16).cpu().numpy()
        for name, array in out.items():
            if not np.isfinite(array).all():  # scaled latents have unit variance; overflow means a broken model
                raise DataError(f"latents of {self.directory} overflow float16 in array {name!r} for an image in "
                                f"this batch: is the autoencoder's scaling_factor right?")
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.codec.kind, "image_size": self.input.image_size,
                "latent_shape": list(self.shape), "scaling_factor": self.codec.scale,
                "shift_factor": self.codec.shift, "with_std": self.with_std, "crop": "center",
                "mean": list(self.input.image_mean), "std": list(self.input.image_std)}
