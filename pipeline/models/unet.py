"""The cascade's denoising network: diffusers' ``UNet2DConditionModel`` built from a typed config, and the one
convention by which every stage (base or super-resolution, pixel or latent) feeds it.

Conditioning convention (training, sampling and anyone loading an exported U-Net use the same):

- ``encoder_hidden_states``: T5 token embeddings (B, L, D_t5), zero at padding; the U-Net's ``encoder_hid_proj``
  projects them to ``cross_attention_dim``. ``encoder_attention_mask``: (B, L) bool, True = real token; it reaches
  every cross-attention (our processors turn diffusers' additive bias back into a key padding mask).
- ``class_labels``: one vector per sample, the concatenation of (in this order, each only when configured)
  the masked mean of the T5 tokens (D_t5), the CLIP image embedding (E; zero when dropped for guidance) and a
  sinusoidal embedding of the super-resolution noise-augmentation level (K) and the SDXL size and crop
  micro-conditioning (6 x S): sinusoidal embeddings of the six pixel counts of "sizes" (B, 6) = original
  height, width (the image as shown, before resizing), crop top, left (in the image resized to cover the
  target) and target height, width (the image the stage makes), one S-wide embedding each, in that order.
  ``class_embed_type="projection"`` maps it through an MLP onto the time embedding, so pooled text, image
  embedding, noise level and sizes all condition the ResNet blocks the way DALL-E 2 / Imagen / SDXL add them to
  the timestep embedding. At sampling the sizes default to "uncropped, original = target": (H, W, 0, 0, H, W).
- ``sample``: the noised image or latent (B, C, H, W), concatenated on channels with the (noise-augmented,
  resized to H x W) low-resolution image for super-resolution stages.

Null condition (classifier-free guidance): T5 tokens all zero with only the first position unmasked, so
cross-attention sees one key whose projection is the learned bias of ``encoder_hid_proj`` - a learned null token
that needs no extra parameter outside the diffusers class - and a zero image embedding. Sizes are kept unless a
stage drops them with the text (``model.micro_conditioning.drop_with_text``); dropped sizes are all zero (a
0 x 0 original and target, which no real image has).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.config_schema import check, doc
from pipeline.diffusion.schedules import check_range
from pipeline.models.dit import dit_forward


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one U-Net stage (the stage derives its input/output channels and conditioning sizes)."""

    channels: int = doc(64, "Channels of the first level.")
    channel_mult: tuple[int, ...] = doc((1, 2), "Per-level channel multiplier; one level per entry, each level "
                                                "after the first halves the resolution.")
    blocks_per_level: int = doc(1, "ResNet blocks per level (down path; the up path has one more, as in diffusers).")
    attention_resolutions: tuple[int, ...] = doc((8,), "Feature-map sides (pixels of the U-Net's own grid) whose "
                                                       "levels get self- and cross-attention; the middle block "
                                                       "always has them.")
    head_width: int = doc(32, "Channels per attention head (heads = level channels / head_width).")
    transformer_depth: int = doc(1, "Transformer blocks per attention layer.")
    cross_attention_dim: int = doc(0, "Width the T5 tokens are projected to for cross-attention; 0 = the widest "
                                      "level's channels.")
    norm_groups: int = doc(32, "GroupNorm groups; must divide every level's channels.")
    dropout: float = doc(0.0, "Dropout probability in the ResNet blocks.")
    scale_shift_norm: bool = doc(True, "Condition ResNet blocks by scale and shift of the normalised features "
                                       "(Imagen/IF 'scale_shift') instead of adding the embedding.")
    pooled_text: bool = doc(True, "Add the masked mean of the T5 tokens to the time embedding (class projection).")
    fused_norm: bool = doc(False, "Run each ResNet block's GroupNorm(+scale/shift)+SiLU pairs as one fused call "
                                  "(the Triton kernel with model.attention: triton; a forward replacement, same state "
                                  "dict; see pipeline/models/fused_norm.py and benchmarks/RESULTS.md).")

    def __post_init__(self) -> None:
        check(self.channels > 0, "model.unet.channels", f"must be > 0, got {self.channels}")
        check(len(self.channel_mult) >= 1 and all(m > 0 for m in self.channel_mult), "model.unet.channel_mult",
              f"must be a non-empty list of positive multipliers, got {list(self.channel_mult)}")
        check(self.blocks_per_level > 0, "model.unet.blocks_per_level", f"must be > 0, got {self.blocks_per_level}")
        check(self.head_width > 0, "model.unet.head_width", f"must be > 0, got {self.head_width}")
        check(self.transformer_depth > 0, "model.unet.transformer_depth", f"must be > 0, got {self.transformer_depth}")
        check(self.cross_attention_dim >= 0, "model.unet.cross_attention_dim",
              f"must be >= 0, got {self.cross_attention_dim}")
        check(0.0 <= self.dropout < 1.0, "model.unet.dropout", f"must be in [0, 1), got {self.dropout}")
        for width in self.widths:
            check(width % self.norm_groups == 0, "model.unet.norm_groups",
                  f"({self.norm_groups}) must divide every level's channels, not {width}")
            check(width % self.head_width == 0, "model.unet.head_width",
                  f"({self.head_width}) must divide every level's channels, not {width}")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mult)


@dataclass(frozen=True)
class Conditioning:
    """Sizes of what one stage's U-Net is conditioned on (derived from its stage config).

    text_dim: T5 width D_t5; pooled_text: masked-mean T5 in the class vector; image_embed_dim: CLIP embedding width
    E (0 = none); level_dim: noise-level embedding width K (0 = base stage); low_res_channels: channels concatenated
    to the sample (0 = base stage); size_dim: width S of each of the six size/crop embeddings (0 = no
    micro-conditioning); backbone: 'unet' (this module's convention) or 'dit' (pipeline/models/dit.py).
    """

    text_dim: int
    pooled_text: bool
    image_embed_dim: int = 0
    level_dim: int = 0
    low_res_channels: int = 0
    size_dim: int = 0
    backbone: str = "unet"

    @property
    def class_dim(self) -> int:
        return (self.text_dim * self.pooled_text + self.image_embed_dim + self.level_dim
                + SIZE_FIELDS * self.size_dim)


def diffusers_kwargs(cfg: UNetConfig, *, sample_size: int, in_channels: int, out_channels: int,
                     cond: Conditioning) -> dict:
    """The ``UNet2DConditionModel`` constructor arguments this config describes (also its exported config.json)."""
    widths = cfg.widths
    sides = [sample_size // 2 ** i for i in range(len(widths))]
    attention = [side in cfg.attention_resolutions for side in sides]
    kwargs = {
        "sample_size": sample_size, "in_channels": in_channels + cond.low_res_channels,
        "out_channels": out_channels, "block_out_channels": widths, "layers_per_block": cfg.blocks_per_level,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        # diffusers' naming quirk: for this class `attention_head_dim` is the number of heads per level
        "attention_head_dim": tuple(w // cfg.head_width for w in widths),
        "cross_attention_dim": cfg.cross_attention_dim or widths[-1],
        "transformer_layers_per_block": cfg.transformer_depth, "norm_num_groups": cfg.norm_groups,
        "dropout": cfg.dropout, "use_linear_projection": True,
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift_norm else "default",
        "encoder_hid_dim": cond.text_dim, "encoder_hid_dim_type": "text_proj",
    }
    if cond.class_dim:
        kwargs.update(class_embed_type="projection", projection_class_embeddings_input_dim=cond.class_dim)
    return kwargs


def build_unet(cfg: UNetConfig, *, sample_size: int, in_channels: int, out_channels: int,
               cond: Conditioning) -> nn.Module:
    """A freshly initialised ``diffusers.UNet2DConditionModel`` (on the current default device, e.g. meta)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**diffusers_kwargs(cfg, sample_size=sample_size, in_channels=in_channels,
                                                   out_channels=out_channels, cond=cond))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens, (B, L) bool mask -> (B, D) mean over the real tokens only (zero when none)."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


# "sizes" (B, 6): original height, width; crop top, left; target height, width (pixels), SDXL's order.
SIZE_FIELDS = 6

# Sinusoidal embeddings are built for positions ~0..1000 (diffusers' timestep embedding, max period 10000); a
# level in [0, 1] is spread over that range so its features vary as much as a timestep's do.
LEVEL_EMBEDDING_SCALE = 1000.0
MAX_PERIOD = 10000.0


def level_embedding(level: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (B, dim) float32 of augmentation levels (B,) in [0, 1].

    [sin(p * f_k), cos(p * f_k)] with p = 1000 * level and f_k = 10000^(-k / (dim/2)), the timestep embedding of
    diffusion U-Nets applied to the level; an odd `dim` gets one zero feature at the end. The U-Net's
    class-embedding projection maps these features to its own width.
    """
    if dim < 2:
        raise ValueError(f"level embedding needs dim >= 2, got {dim}")
    level = torch.as_tensor(level)
    if level.dim() != 1:
        raise ValueError(f"levels must have shape (B,), got {tuple(level.shape)}")
    check_range(level, 0.0, 1.0, "noise-augmentation levels")
    return sinusoidal(level.to(torch.float32) * LEVEL_EMBEDDING_SCALE, dim)


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) float32 [sin(p * f_k), cos(p * f_k)], f_k = 10000^(-k / (dim/2)); odd dim: one
    zero feature at the end."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    args = positions.to(torch.float32)[:, None] * freqs[None, :]
    features = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        features = torch.nn.functional.pad(features, (0, 1))
    return features


def size_embedding(sizes: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL micro-conditioning features (B, 6 * dim) float32 of "sizes" (B, 6) pixel counts (see the module doc).

    Each count is embedded on its own as a position in pixels (as SDXL does: sides of 8-2048 px span the
    timestep embedding's range), the six embeddings concatenated in order.
    """
    if dim < 2:
        raise ValueError(f"size embedding needs dim >= 2, got {dim}")
    if sizes.dim() != 2 or sizes.shape[1] != SIZE_FIELDS:
        raise ValueError(f"sizes must have shape (B, {SIZE_FIELDS}), got {tuple(sizes.shape)}")
    return sinusoidal(sizes.reshape(-1), dim).view(sizes.shape[0], SIZE_FIELDS * dim)


def default_sizes(batch: int, height: int, width: int, *, original: tuple[int, int] | None = None,
                  crop_top_left: tuple[int, int] = (0, 0), device: torch.device | None = None) -> torch.Tensor:
    """(B, 6) int64 sizes for sampling a height x width image: original (default: = target), crop (default 0, 0)."""
    orig_h, orig_w = original or (height, width)
    row = torch.tensor([orig_h, orig_w, crop_top_left[0], crop_top_left[1], height, width], dtype=torch.int64)
    return row.to(device).expand(batch, -1).clone()


def class_vector(cond: Conditioning, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The (B, class_dim) class-label vector of the convention above, or None when the U-Net has no class input."""
    parts = []
    if cond.pooled_text:
        parts.append(masked_mean(inputs["text"], inputs["mask"]))
    if cond.image_embed_dim:
        parts.append(inputs["image_embed"].to(inputs["text"].dtype))
    if cond.level_dim:
        parts.append(level_embedding(inputs["level"], cond.level_dim).to(inputs["text"].dtype))
    if cond.size_dim:
        parts.append(size_embedding(inputs["sizes"], cond.size_dim).to(inputs["text"].dtype))
    return torch.cat(parts, dim=1) if parts else None


def unet_forward(unet: nn.Module, cond: Conditioning, x_t: torch.Tensor, t: torch.Tensor,
                 inputs: dict[str, torch.Tensor], *, dynamic_size: bool = False) -> torch.Tensor:
    """One denoiser call under the convention above.

    x_t: (B, C, H, W); t: (B,) timesteps (integer or fractional); inputs: "text" (B, L, D_t5), "mask" (B, L) bool,
    and when configured "image_embed" (B, E), "low_res" (B, C_low, H, W), "level" (B,) in [0, 1], "sizes" (B, 6).
    Returns the network output (B, C_out, H, W) in the U-Net's dtype. A DiT backbone (``cond.backbone``) is
    called under its own convention (:func:`pipeline.models.dit.dit_forward`). dynamic_size: mark H and W of the
    network's input dynamic for torch.compile (one graph for every bucket shape; nothing changes in eager mode).
    """
    if cond.backbone == "dit":
        return dit_forward(unet, x_t, t, inputs, super_res=bool(cond.low_res_channels))
    sample = x_t if not cond.low_res_channels else torch.cat([x_t, inputs["low_res"].to(x_t.dtype)], dim=1)
    if dynamic_size:
        torch._dynamo.maybe_mark_dynamic(sample, 2)
        torch._dynamo.maybe_mark_dynamic(sample, 3)
    return unet(sample, t, encoder_hidden_states=inputs["text"], class_labels=class_vector(cond, inputs),
                encoder_attention_mask=inputs["mask"]).sample


def null_condition(inputs: dict[str, torch.Tensor], drop: torch.Tensor, *,
                   keys: tuple[str, ...] = ("text", "image_embed")) -> dict[str, torch.Tensor]:
    """`inputs` with the condition replaced by the null condition where `drop` (B,) bool is True.

    Text: all-zero tokens with only position 0 unmasked; image embedding and sizes: zeros. Entries not in `keys`
    (and the low-res image and noise level, which guidance never drops) are kept.
    """
    out = dict(inputs)
    if "text" in keys:
        keep = ~drop[:, None, None]
        out["text"] = inputs["text"] * keep.to(inputs["text"].dtype)
        null_mask = torch.zeros_like(inputs["mask"])
        null_mask[:, 0] = True
        out["mask"] = torch.where(drop[:, None], null_mask, inputs["mask"])
    if "image_embed" in keys and "image_embed" in inputs:
        out["image_embed"] = inputs["image_embed"] * (~drop[:, None]).to(inputs["image_embed"].dtype)
    if "sizes" in keys and "sizes" in inputs:
        out["sizes"] = torch.where(drop[:, None], torch.zeros_like(inputs["sizes"]), inputs["sizes"])
    return out


Space = Literal["pixel", "latent"]
