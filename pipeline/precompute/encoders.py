"""Frozen encoders that ``python -m pipeline shards precompute`` runs over every sample: a registry of named
encoders, the only dispatch.

An encoder is named on the command line as ``NAME:ARG`` (``t5:PATH[:MAXLEN]``, ``clip-text:CLIP_DIR``,
``clip-image:CLIP_DIR``, ``latents:AE_DIR``). :data:`ENCODERS` maps NAME to an import string ``module:Class``,
imported only when used (the CLI lists the names without loading any network code), so adding an encoder is one
line here plus its class, and nothing in the command changes. An encoder class provides (see :class:`Encoder`):

    from_arg(arg, ctx)   classmethod building it from ARG (ctx: device + a cache to share loaded models)
    needs_caption        whether it reads the caption
    input                SampleSpec of the image it reads: image_size 0 = none; otherwise the image is decoded,
                         center-cropped and normalised exactly as the reader does for evaluation
    arrays()             {array name: ArraySpec(dtype, per-sample shape)}
    encode(captions, images) -> {array name: numpy (B, *shape)}; images float32 (B, 3, S, S) on ctx.device
    describe()           JSON facts recorded in shards.json (the spec string is added by the caller)

Per-bucket encoders (``--buckets-config RUN.yaml``, ctx.buckets) also have ``options``: the training loader's
ImageOptions with that config's buckets; their images are placed and cropped by it and passed one bucket shape
per ``encode`` call, as ``encode(captions, images, crops)`` with crops the B transforms.Crop records; their
arrays() then declare None for the sides that follow the bucket (ArraySpec.buckets lists the image shapes) and
include precomputed_index.CROP_ARRAY.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from pipeline.data.spec import SampleSpec
from pipeline.data.transforms import ImageOptions
from pipeline.errors import ConfigError, DataError, UsageError
from pipeline.text.t5 import FrozenT5Encoder, T5EncoderConfig

ENCODERS: dict[str, str] = {
    "t5": "pipeline.precompute.encoders:T5Arrays",
    "clip-text": "pipeline.precompute.encoders:ClipTextArrays",
    "clip-image": "pipeline.precompute.encoders:ClipImageArrays",
    "latents": "pipeline.precompute.latents:LatentArrays",
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / _STD
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
NO_IMAGE = SampleSpec(image_size=0)


@dataclass(frozen=True)
class ArraySpec:
    """dtype (numpy name) and per-sample shape of one precomputed array; None for a side that follows the
    sample's bucket, whose (height, width) image shapes `buckets` lists (() for square centre crops)."""

    dtype: str
    shape: tuple[int | None, ...]
    buckets: tuple[tuple[int, int], ...] = ()


@dataclass
class EncoderContext:
    """Passed to every encoder of one precompute run: where to run, loaded models to share by key, and with
    --buckets-config the training loader's bucket placement (None: square centre crops)."""

    device: torch.device
    cache: dict[Any, Any] = field(default_factory=dict)
    buckets: ImageOptions | None = None


class Encoder(Protocol):
    name: ClassVar[str]
    needs_caption: bool
    input: SampleSpec

    def arrays(self) -> dict[str, ArraySpec]: ...

    def encode(self, captions: list[str] | None, images: torch.Tensor | None) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


def build_encoder(spec: str, ctx: EncoderContext) -> Encoder:
    """The encoder named by ``NAME:ARG``; UsageError for an unknown NAME or a missing ARG."""
    name, sep, arg = spec.partition(":")
    if name not in ENCODERS:
        raise UsageError(f"--encoder {spec!r}: unknown encoder {name!r}; valid: {', '.join(sorted(ENCODERS))} "
                         f"(as NAME:ARG, e.g. t5:PATH[:MAXLEN] or clip-image:CLIP_DIR)")
    if not sep or not arg:
        raise UsageError(f"--encoder {spec!r}: expected {name}:ARG (a model path)")
    module_name, _, attr = ENCODERS[name].partition(":")
    return getattr(importlib.import_module(module_name), attr).from_arg(arg, ctx)


def build_encoders(specs: list[str] | tuple[str, ...], ctx: EncoderContext) -> list[Encoder]:
    """Every encoder of `specs`; UsageError when two of them would write an array of the same name."""
    encoders = [build_encoder(s, ctx) for s in specs]
    seen: dict[str, str] = {}
    for spec, encoder in zip(specs, encoders):
        for array in encoder.arrays():
            if array in seen:
                raise UsageError(f"--encoder {spec!r} and {seen[array]!r} both write array {array!r}; "
                                 f"keep only one of them")
            seen[array] = spec
    return encoders


class T5Arrays:
    """``t5:PATH[:MAXLEN]`` -> "t5_emb" float16 (L, D) (zero at padding) and "t5_mask" bool (L,) (True = token)."""

    name = "t5"
    needs_caption = True
    input = NO_IMAGE

    def __init__(self, path: str, max_length: int, ctx: EncoderContext) -> None:
        self.path, self.max_length = path, max_length
        self.model = FrozenT5Encoder(T5EncoderConfig(path=path, max_length=max_length)).to(ctx.device).eval()

    @classmethod
    def from_arg(cls, arg: str, ctx: EncoderContext) -> T5Arrays:
        path, sep, tail = arg.rpartition(":")
        if sep and tail.isdigit():
            return cls(path, int(tail), ctx)
        return cls(arg, T5EncoderConfig().max_length, ctx)

    def arrays(self) -> dict[str, ArraySpec]:
        return {"t5_emb": ArraySpec("float16", (self.max_length, self.model.dim)),
                "t5_mask": ArraySpec("bool", (self.max_length,))}

    def encode(self, captions: list[str] | None, images: torch.Tensor | None) -> dict[str, np.ndarray]:
        emb, mask = self.model.encode(list(captions or []))
        emb16 = emb.float().to(torch.float16).cpu().numpy()
        if not np.isfinite(emb16).all():  # T5 activations can exceed the fp16 range: never store inf silently
            raise DataError(f"T5 embeddings of {self.path} overflow float16 (|x| > 65504) for a caption in this "
                            f"batch: this encoder cannot be stored in float16")
        return {"t5_emb": emb16, "t5_mask": mask.cpu().numpy().astype(bool)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "max_length": self.max_length, "d_model": self.model.dim}


@dataclass
class _OpenClip:
    model: torch.nn.Module
    tokenizer: Any
    input: SampleSpec
    embed_dim: int


def _image_size(model_cfg: dict) -> int:
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ConfigError(f"non-square CLIP image size {size} is not supported")
        size = size[0]
    return int(size)


def _load_open_clip(directory: str, device: torch.device) -> _OpenClip:
    """An exported open_clip ``local-dir:`` folder (open_clip_config.json + weights), loaded by open_clip."""
    import open_clip

    folder = Path(directory)
    config_path = folder / "open_clip_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{directory}: no open_clip_config.json; clip-text:/clip-image: need an exported CLIP "
                          f"folder (open_clip_config.json + open_clip_model.safetensors)")
    if not any(folder.glob(pattern) for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth")):
        raise ConfigError(f"{directory}: no CLIP weights (*.safetensors/.bin/.pt) next to open_clip_config.json; "
                          f"open_clip would silently use random weights")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    pre = config.get("preprocess_cfg", {})
    spec = SampleSpec(image_size=_image_size(config["model_cfg"]), image_mean=tuple(pre.get("mean", OPENAI_MEAN)),
                      image_std=tuple(pre.get("std", OPENAI_STD)))
    return _OpenClip(model.to(device).eval(), tokenizer, spec, int(config["model_cfg"]["embed_dim"]))


def _open_clip(directory: str, ctx: EncoderContext) -> _OpenClip:
    """Loaded once per run even when both clip-text: and clip-image: name the same folder."""
    key = ("open_clip", str(Path(directory).resolve()))
    if key not in ctx.cache:
        ctx.cache[key] = _load_open_clip(directory, ctx.device)
    return ctx.cache[key]


class ClipTextArrays:
    """``clip-text:CLIP_DIR`` -> "clip_text_emb" float32 (E,), L2-normalised (open_clip encode_text)."""

    name = "clip-text"
    needs_caption = True
    input = NO_IMAGE

    def __init__(self, directory: str, ctx: EncoderContext) -> None:
        self.directory, self.clip, self.device = directory, _open_clip(directory, ctx), ctx.device

    @classmethod
    def from_arg(cls, arg: str, ctx: EncoderContext) -> ClipTextArrays:
        return cls(arg, ctx)

    def arrays(self) -> dict[str, ArraySpec]:
        return {"clip_text_emb": ArraySpec("float32", (self.clip.embed_dim,))}

    def encode(self, captions: list[str] | None, images: torch.Tensor | None) -> dict[str, np.ndarray]:
        tokens = self.clip.tokenizer(list(captions or [])).to(self.device)
        features = self.clip.model.encode_text(tokens, normalize=True)
        return {"clip_text_emb": features.float().cpu().numpy()}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "embed_dim": self.clip.embed_dim}


class ClipImageArrays:
    """``clip-image:CLIP_DIR`` -> "clip_image_emb" float32 (E,), L2-normalised (open_clip encode_image) of the
    center crop at the model's image size, normalised with the folder's (OpenAI) mean/std."""

    name = "clip-image"
    needs_caption = False

    def __init__(self, directory: str, ctx: EncoderContext) -> None:
        self.directory, self.clip = directory, _open_clip(directory, ctx)
        self.input = self.clip.input

    @classmethod
    def from_arg(cls, arg: str, ctx: EncoderContext) -> ClipImageArrays:
        return cls(arg, ctx)

    def arrays(self) -> dict[str, ArraySpec]:
        return {"clip_image_emb": ArraySpec("float32", (self.clip.embed_dim,))}

    def encode(self, captions: list[str] | None, images: torch.Tensor | None) -> dict[str, np.ndarray]:
        assert images is not None
        return {"clip_image_emb": self.clip.model.encode_image(images, normalize=True).float().cpu().numpy()}

    def describe(self) -> dict[str, Any]:
        spec = self.input
        return {"name": self.name, "embed_dim": self.clip.embed_dim, "image_size": spec.image_size,
                "mean": list(spec.image_mean), "std": list(spec.image_std), "crop": "center"}
