"""The typed `model:` section of a `stage: unet` config (base or super-resolution, pixel or latent space)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config_schema import check, doc
from pipeline.diffusion.schedules import DiffusionConfig
from pipeline.errors import ConfigError
from pipeline.models.attention import ATTENTION_BACKENDS
from pipeline.models.dit import DiTConfig
from pipeline.models.unet import UNetConfig
from pipeline.sampling.cascade import SamplingConfig
from pipeline.text.t5 import TINY, TINY_DIMS, T5EncoderConfig
from pipeline.train.weights import checkpoint_config


@dataclass(frozen=True)
class SuperResConfig:
    """Super-resolution: which low-resolution image this stage upsamples and how it is noise-augmented."""

    low_res: int = doc(0, "Side in pixels of the image this stage upsamples (the previous stage's resolution); "
                          "0 = a base stage.")
    max_train_noise_level: float = doc(0.5, "Training draws the augmentation level uniformly in [0, this] "
                                            "(level l = timestep l*(T-1) of this stage's noise schedule).")
    sample_noise_level: float = doc(0.2, "Augmentation level of the low-resolution image at sampling (0-1).")
    level_embed_dim: int = doc(32, "Width of the sinusoidal level features fed to the class embedding.")

    def __post_init__(self) -> None:
        check(self.low_res >= 0, "model.super_res.low_res", f"must be >= 0, got {self.low_res}")
        for key in ("max_train_noise_level", "sample_noise_level"):
            value = getattr(self, key)
            check(0.0 <= value <= 1.0, f"model.super_res.{key}", f"must be in [0, 1], got {value}")
        check(self.level_embed_dim >= 2, "model.super_res.level_embed_dim", f"must be >= 2, got {self.level_embed_dim}")


@dataclass(frozen=True)
class ImageEmbedConfig:
    """unCLIP conditioning: the CLIP image embedding of each sample at training, the prior's output at sampling."""

    dim: int = doc(0, "Width of the CLIP image embedding; 0 = no image-embedding conditioning.")
    clip: str = doc("", "The exported CLIP folder (open_clip local-dir) whose image embeddings condition this "
                        "stage; training reads them precomputed (array clip_image_emb of data.precomputed_urls: "
                        "python -m pipeline shards precompute SRC --out DIR --encoder clip-image:CLIP_DIR), at the "
                        "CLIP's own resolution whatever this stage's resolution is.")
    drop_prob: float = doc(0.1, "Probability that a sample's image embedding alone is replaced by zeros (the "
                                "text kept). model.cond_drop_prob drops text and embedding together (the "
                                "unconditional branch of guidance).")
    text_drop_prob: float = doc(0.1, "Probability that a sample's text alone is replaced by the null condition (the "
                                     "embedding kept): the state DALL-E 2 variations sample from.")

    def __post_init__(self) -> None:
        check(self.dim >= 0, "model.image_embed.dim", f"must be >= 0, got {self.dim}")
        check(0.0 <= self.drop_prob < 1.0, "model.image_embed.drop_prob", f"must be in [0, 1), got {self.drop_prob}")
        check(0.0 <= self.text_drop_prob < 1.0, "model.image_embed.text_drop_prob",
              f"must be in [0, 1), got {self.text_drop_prob}")
        check(not self.dim or bool(self.clip), "model.image_embed.clip",
              "must name the exported CLIP folder whose embeddings condition the stage (model.image_embed.dim > 0)")


@dataclass(frozen=True)
class MicroConditioningConfig:
    """SDXL size and crop conditioning: the U-Net sees each training image's original size, crop and target size
    (pipeline/models/unet.py, "sizes"), so at sampling "uncropped, original = target" asks for whole framing."""

    enabled: bool = doc(False, "Condition on original height/width, crop top/left and target height/width (needs "
                               "data.buckets.enabled: the bucketed loader records them).")
    embed_dim: int = doc(32, "Width of the sinusoidal features of each of the six pixel counts (6 x this are added "
                             "to the class vector).")
    drop_with_text: bool = doc(False, "Replace the sizes by the null sizes (zeros) whenever the text is dropped for "
                                      "guidance, so guidance also pushes towards them; off (SDXL): kept in both "
                                      "branches.")

    def __post_init__(self) -> None:
        check(self.embed_dim >= 2, "model.micro_conditioning.embed_dim", f"must be >= 2, got {self.embed_dim}")


@dataclass(frozen=True)
class UNetStageConfig:
    """The `model:` section of a `stage: unet` config."""

    name: str = doc("base", "Component name in an export bundle (unet_<name>); e.g. 'base', 'sr64', 'sr256'.")
    space: Literal["pixel", "latent"] = doc("pixel", "Where diffusion runs: 'pixel' (images in [-1, 1]) or 'latent' "
                                                     "(scaled latents of model.autoencoder).")
    autoencoder: str = doc("", "Latent space: the frozen autoencoder, an exported component folder (BUNDLE/"
                               "autoencoder) or an autoencoder run dir; data.resolution is the image side it encodes.")
    latent_source: Literal["encoder", "precomputed"] = doc(
        "encoder", "Latent space: 'encoder' encodes each batch with the frozen autoencoder; 'precomputed' reads the "
                   "'latent' arrays of data.precomputed_urls (shards precompute --encoder latents:AE_DIR; with "
                   "data.buckets add --buckets-config RUN.yaml and use data.crop: center).")
    backbone: Literal["unet", "dit"] = doc("unet", "Denoising network: 'unet' (diffusers UNet2DConditionModel, "
                                                   "model.unet) or 'dit' (PixArt-alpha's transformer with T5 "
                                                   "cross-attention, model.dit; see pipeline/models/dit.py).")
    unet: UNetConfig = doc(UNetConfig(), "U-Net architecture (backbone: unet).")
    dit: DiTConfig = doc(DiTConfig(), "Transformer architecture (backbone: dit).")
    text_encoder: T5EncoderConfig = doc(T5EncoderConfig(path=TINY, max_length=24),
                                        "Frozen T5 encoder (path: local dir, hub id, or 'tiny').")
    text_source: Literal["encoder", "precomputed"] = doc(
        "encoder", "'encoder' runs the frozen T5 on each batch; 'precomputed' reads t5_emb/t5_mask arrays from "
                   "data.precomputed_urls (python -m pipeline shards precompute --encoder t5:PATH:MAXLEN).")
    attention: Literal["sdpa", "triton", "xformers"] = doc("sdpa", "Attention kernel of every attention of the "
                                                                   "network (U-Net or DiT).")
    diffusion: DiffusionConfig = doc(DiffusionConfig(), "Noise schedule, training target and loss weighting.")
    loss_mask: bool = doc(False, "Weight the denoising loss per pixel by each training sample's optional "
                                 "KEY.mask.png (grayscale, the image's aspect ratio, cropped with it; 255 = full "
                                 "weight, 0 = ignored, e.g. watermarks or padding; samples without one weigh 1 "
                                 "everywhere); resized to the latent grid by area for latent stages.")
    cond_drop_prob: float = doc(0.1, "Probability that a sample's whole condition (text, and the image embedding "
                                     "of an unCLIP stage) is replaced by the null condition (classifier-free "
                                     "guidance training).")
    super_res: SuperResConfig = doc(SuperResConfig(), "Super-resolution settings (low_res 0 = base stage).")
    image_embed: ImageEmbedConfig = doc(ImageEmbedConfig(), "CLIP image-embedding (unCLIP) conditioning.")
    micro_conditioning: MicroConditioningConfig = doc(MicroConditioningConfig(),
                                                      "SDXL size and crop conditioning (off by default).")
    sampling: SamplingConfig = doc(SamplingConfig(), "Default sampling settings (grids, evaluation, export).")
    eval_prompts: int = doc(0, "Held-out captions per evaluation whose samples are scored for prompt fidelity "
                               "(per run, in evaluation batches; 0 = off). The checker reads only the synthetic "
                               "scenes' caption grammar (pipeline/eval/fidelity.py): captions it cannot parse are "
                               "not sampled, and configs for real data leave this at 0.")
    grid_images: int = doc(16, "Images in the periodic sample grid (held-out prompts).")

    def __post_init__(self) -> None:
        check(bool(self.name) and self.name.replace("_", "").isalnum(), "model.name",
              f"must be a non-empty identifier (letters, digits, _), got {self.name!r}")
        check(self.backbone in ("unet", "dit"), "model.backbone", f"must be unet or dit, got {self.backbone!r}")
        check(self.backbone == "unet" or not self.micro_conditioning.enabled, "model.micro_conditioning.enabled",
              "size and crop conditioning enters through the U-Net's class embedding: use model.backbone unet")
        check(self.backbone == "unet" or not self.image_embed.dim, "model.image_embed.dim",
              "unCLIP conditioning enters through the U-Net's class embedding: use model.backbone unet")
        check(self.attention in ATTENTION_BACKENDS, "model.attention", f"must be one of {ATTENTION_BACKENDS}")
        check(0.0 <= self.cond_drop_prob < 1.0, "model.cond_drop_prob", f"must be in [0, 1), got {self.cond_drop_prob}")
        check(self.eval_prompts >= 0 and self.grid_images >= 0, "model.eval_prompts",
              "eval_prompts and grid_images must be >= 0")
        check(self.space == "pixel" or bool(self.autoencoder), "model.autoencoder",
              "must name the frozen autoencoder (exported folder or run dir) when model.space is 'latent'")
        check(self.space == "latent" or not self.autoencoder, "model.autoencoder",
              "only applies to model.space: latent")
        check(self.space == "latent" or self.latent_source == "encoder", "model.latent_source",
              "only applies to model.space: latent")


def _is_local(path: str) -> bool:
    """A path (not 'tiny' and not a hub id such as 'google/t5-v1_1-xxl') that must exist on disk."""
    if path == TINY:
        return False
    parts = path.split("/")
    looks_like_hub_id = len(parts) == 2 and all(parts) and not path.startswith((".", "~")) and not Path(path).exists()
    return not looks_like_hub_id


# d_model of the public T5 encoders, so a config naming one by hub id is understood offline (no download just to
# size the U-Net; loading the encoder itself still needs the weights).
KNOWN_T5_WIDTHS = {"t5-v1_1-small": 512, "t5-v1_1-base": 768, "t5-v1_1-large": 1024, "t5-v1_1-xl": 2048,
                   "t5-v1_1-xxl": 4096, "flan-t5-small": 512, "flan-t5-base": 768, "flan-t5-large": 1024,
                   "flan-t5-xl": 2048, "flan-t5-xxl": 4096}


def text_encoder_dim(cfg: T5EncoderConfig) -> int:
    """d_model of a T5 encoder config without loading its weights."""
    if cfg.path == TINY:
        return TINY_DIMS["d_model"]
    known = KNOWN_T5_WIDTHS.get(cfg.path.rstrip("/").split("/")[-1])
    if known is not None and not Path(cfg.path).exists():
        return known
    from transformers import AutoConfig  # transformers takes seconds to import: only when a T5 is read

    try:
        return int(AutoConfig.from_pretrained(cfg.path).d_model)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.text_encoder.path: cannot read a T5 config from {cfg.path!r}: "
                          f"{str(exc).splitlines()[0]}") from None


def autoencoder_geometry(path: str) -> tuple[int, int, int]:
    """(latent channels, downsampling factor f, image side it was trained at) of an exported autoencoder folder or
    an autoencoder run dir, read from configs only (no weights)."""
    folder = Path(path)
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        return (int(data["latent_channels"]), 2 ** (len(data["block_out_channels"]) - 1),
                int(data.get("sample_size") or 0))
    _, cfg = checkpoint_config(folder)
    if cfg.stage != "autoencoder":
        raise ConfigError(f"model.autoencoder: {path} is a {cfg.stage!r} run, not an autoencoder run")
    return cfg.model.autoencoder.latent_channels, cfg.model.autoencoder.factor, cfg.data.resolution


def check_buckets(buckets: tuple[tuple[int, int], ...], resolution: int, factor: int, grid_multiple: int,
                  why: str, low_res: int) -> None:
    """ConfigError unless every (height, width) bucket is whole latent cells (autoencoder factor; 1 in pixel space)
    that the network's grid multiple divides (the U-Net's 2^(levels-1) down-sampling, `why` says which), and
    (super-resolution) scales by low_res / resolution to a whole low-resolution image: the same bucket at the
    previous stage's resolution."""
    divisor = factor * grid_multiple
    multiple = resolution // math.gcd(low_res, resolution) if low_res else 1
    for height, width in buckets:
        if height % divisor or width % divisor:
            raise ConfigError(f"data.buckets: bucket {height}x{width} is not divisible by {divisor} (autoencoder "
                              f"factor {factor} x {grid_multiple}: {why}); choose a step (or shapes) that it divides")
        if height % multiple or width % multiple:
            raise ConfigError(f"data.buckets: bucket {height}x{width} at {resolution} px is no whole image at the "
                              f"low resolution {low_res} px (model.super_res.low_res); choose a step (or shapes) "
                              f"that {multiple} divides")
