"""CLIP dual encoder built from open_clip's own model classes.

Either a named open_clip architecture (``arch: ViT-B-32``, ``ViT-L-14``, ...) or a custom tiny vision/text
tower config (``arch: custom``, for the demo and tests). The model is open_clip's ``CLIP`` (or
``CustomTextCLIP``) class built from an open_clip ``model_cfg`` dict, and that same dict is what export writes
into ``open_clip_config.json`` - so an exported folder loads in open_clip itself and behaves the same.

Shapes: images (B, 3, S, S) normalised with open_clip's mean/std; tokens int64 (B, context_length);
features (B, embed_dim), L2-normalised.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from pipeline.config_schema import check, doc
from pipeline.errors import ConfigError


@dataclass(frozen=True)
class ClipVisionConfig:
    """ViT image tower (used when arch is 'custom')."""

    image_size: int = doc(64, "Input side length in pixels (must equal data.resolution).")
    patch_size: int = doc(8, "Pixels per patch side; image_size must be a multiple.")
    width: int = doc(128, "Transformer width (channels).")
    layers: int = doc(3, "Transformer blocks.")
    head_width: int = doc(32, "Channels per attention head (heads = width / head_width).")
    mlp_ratio: float = doc(4.0, "MLP hidden width as a multiple of `width`.")


@dataclass(frozen=True)
class ClipTextConfig:
    """Causal transformer text tower with open_clip's BPE tokenizer (used when arch is 'custom')."""

    context_length: int = doc(32, "Tokens per caption (longer captions are truncated, shorter padded).")
    vocab_size: int = doc(49408, "Token vocabulary; 49408 is open_clip's BPE tokenizer.")
    width: int = doc(128, "Transformer width (channels).")
    heads: int = doc(4, "Attention heads.")
    layers: int = doc(3, "Transformer blocks.")
    mlp_ratio: float = doc(4.0, "MLP hidden width as a multiple of `width`.")


@dataclass(frozen=True)
class ClipConfig:
    """The `model:` section of a `stage: clip` config."""

    arch: str = doc("custom", "An open_clip architecture name (e.g. 'ViT-B-32', 'ViT-L-14') or 'custom' for the "
                              "towers given by `embed_dim`, `vision` and `text`.")
    pretrained: str = doc("", "Initial weights: '' (random init), a checkpoint file (.safetensors/.pt/.bin), an "
                              "exported folder with open_clip_config.json, or an open_clip pretrained tag such as "
                              "'laion2b_s34b_b79k' (downloaded from the hub).")
    embed_dim: int = doc(64, "Shared embedding width of both towers (custom arch).")
    vision: ClipVisionConfig = doc(ClipVisionConfig(), "Image tower (custom arch).")
    text: ClipTextConfig = doc(ClipTextConfig(), "Text tower (custom arch).")
    quick_gelu: bool = doc(False, "Use QuickGELU activations (OpenAI's original weights need it).")
    loss: Literal["clip", "siglip"] = doc("clip", "Contrastive softmax (InfoNCE) or SigLIP pairwise sigmoid loss.")
    local_loss: bool = doc(False, "CLIP loss on local rows x global columns only: memory linear in global batch.")
    gather_with_grad: bool = doc(True, "Backpropagate through the cross-rank feature gather (exact gradients).")
    init_logit_scale: float = doc(math.log(1 / 0.07), "Initial log of the logit scale (inverse temperature).")
    init_logit_bias: float = doc(-10.0, "Initial logit bias (SigLIP loss only).")
    max_logit_scale: float = doc(100.0, "Upper clamp of the logit scale (not its log), as in CLIP.")

    def __post_init__(self) -> None:
        if self.arch != "custom":
            check(self.arch in open_clip.list_models(), "model.arch",
                  f"{self.arch!r} is not an open_clip architecture (see open_clip.list_models()) nor 'custom'")
            defaults = ClipConfig()
            check((self.embed_dim, self.vision, self.text) == (defaults.embed_dim, defaults.vision, defaults.text),
                  "model.arch", f"is {self.arch!r}: model.embed_dim/vision/text only apply to arch 'custom'")
        v = self.vision
        check(v.image_size % v.patch_size == 0, "model.vision.image_size",
              f"({v.image_size}) must be a multiple of model.vision.patch_size ({v.patch_size})")
        check(v.width % v.head_width == 0, "model.vision.width",
              f"({v.width}) must be a multiple of model.vision.head_width ({v.head_width})")
        check(self.text.width % self.text.heads == 0, "model.text.width",
              f"({self.text.width}) must be a multiple of model.text.heads ({self.text.heads})")
        check(self.max_logit_scale > 1.0, "model.max_logit_scale", f"must be > 1, got {self.max_logit_scale}")


def open_clip_model_cfg(cfg: ClipConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` dict (JSON-serialisable) this config describes."""
    if cfg.arch != "custom":
        model_cfg = copy.deepcopy(open_clip.get_model_config(cfg.arch))
    else:
        v, t = cfg.vision, cfg.text
        model_cfg = {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                           "layers": v.layers, "head_width": v.head_width, "mlp_ratio": v.mlp_ratio},
            "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                         "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio},
        }
    if cfg.quick_gelu:
        model_cfg["quick_gelu"] = True
    model_cfg["init_logit_scale"] = cfg.init_logit_scale
    if cfg.loss == "siglip":
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg


def image_size_of(model_cfg: dict[str, Any]) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ConfigError(f"non-square CLIP image size {size} is not supported")
        size = size[0]
    return int(size)


def preprocess_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """open_clip's preprocessing for this model: what the data reader reproduces and export records."""
    return {"size": image_size_of(model_cfg), "mode": "RGB", "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def _model_class(model_cfg: dict[str, Any]) -> type[nn.Module]:
    custom_text = model_cfg.get("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
    if "multimodal_cfg" in model_cfg:
        raise ConfigError("CoCa architectures are not supported by the clip stage; pick a CLIP architecture")
    return open_clip.CustomTextCLIP if custom_text else open_clip.CLIP


def build_clip(cfg: ClipConfig) -> nn.Module:
    """An open_clip CLIP model with random init or the weights named by `cfg.pretrained`."""
    model_cfg = open_clip_model_cfg(cfg)
    kwargs = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    model = _model_class(model_cfg)(**kwargs)
    if cfg.pretrained:
        _load_pretrained(model, cfg)
    open_clip.set_model_preprocess_cfg(model, preprocess_cfg(model_cfg))
    return model


def is_pretrained_tag(cfg: ClipConfig) -> bool:
    """Whether model.pretrained names an open_clip pretrained tag of model.arch (hub weights), not a local path."""
    return cfg.arch != "custom" and cfg.pretrained in open_clip.list_pretrained_tags_by_model(cfg.arch)


def _load_pretrained(model: nn.Module, cfg: ClipConfig) -> None:
    source = Path(cfg.pretrained)
    if source.is_dir():
        found = sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin")) + sorted(source.glob("*.pt"))
        if not found:
            raise ConfigError(f"model.pretrained: no .safetensors/.bin/.pt weights in directory {source}")
        source = found[0]
    if source.is_file():
        try:
            open_clip.load_checkpoint(model, str(source), strict=True, weights_only=True)
        except RuntimeError as exc:  # strict load: mismatched keys/shapes
            raise ConfigError(f"model.pretrained: {source} does not fit arch {cfg.arch!r}: "
                              f"{str(exc).splitlines()[0]}") from None
        return
    if is_pretrained_tag(cfg):
        url_model = open_clip.create_model(cfg.arch, pretrained=cfg.pretrained)  # downloads from the hub
        model.load_state_dict(url_model.state_dict(), strict=True)
        return
    raise ConfigError(f"model.pretrained: {cfg.pretrained!r} is neither an existing file/folder nor a pretrained "
                      f"tag of {cfg.arch!r}")


class ClipTokenize:
    """Batched caption tokenizer for the data workers: list[str] -> {"text": int64 (B, context_length)}.

    A plain class (not a lambda) so it can be pickled into DataLoader worker processes.
    """

    def __init__(self, cfg: ClipConfig) -> None:
        context = open_clip_model_cfg(cfg)["text_cfg"].get("context_length", 77)
        self.tokenizer = open_clip.get_tokenizer(cfg.arch if cfg.arch != "custom" else "ViT-B-32",
                                                 context_length=context)

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return {"text": self.tokenizer(captions)}
