"""The transformer backbone (``model.backbone: dit``): diffusers' ``PixArtTransformer2DModel`` from a typed config.

Why PixArt-alpha's DiT and not SD3's MMDiT (``SD3Transformer2DModel``): the cascade conditions on T5 tokens with
a padding mask, and PixArt attends to them through a separate cross-attention per block, whose key padding mask
diffusers forwards (as an additive bias our processors read back, pipeline/models/diffusers_attention.py). MMDiT
concatenates text and image tokens into one joint self-attention and its stock processor takes no mask at all, so
padding tokens would be attended to (the output would depend on the padding length), and it also wants a pooled
CLIP vector we do not have. PixArt also needs no extra parameters for our null condition: the caption projection's
bias turns the all-zero null tokens into a learned null token, as the U-Net's text projection does.

Conditioning convention (training, sampling and anyone loading the exported folder):
- ``hidden_states``: the noised sample (B, C, H, W), concatenated on channels with the noise-augmented low-res
  image for super-resolution stages (as for the U-Net); H and W divisible by the patch size.
- ``encoder_hidden_states``: T5 tokens (B, L, D_t5), zero at padding, projected by ``caption_projection``;
  ``encoder_attention_mask`` (B, L) bool, True = real token: it reaches every block's cross-attention.
- ``timestep``: the diffusion timestep (B,) (for flow matching s * T).
- super-resolution stages only (``use_additional_conditions``): ``added_cond_kwargs["aspect_ratio"]`` (B, 1) carries
  the noise-augmentation level * 1000 (PixArt's sinusoidal size embedding, added to the timestep embedding) and
  ``added_cond_kwargs["resolution"]`` (B, 2) the sample's (H, W).

Shapes: x_t (B, C, H, W); t (B,); inputs as in :func:`pipeline.models.unet.unet_forward`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config_schema import check, doc

# A level in [0, 1] spread over the range sinusoidal timestep features are built for (as the U-Net's level features)
LEVEL_SCALE = 1000.0


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT stage (the stage derives input/output channels, sample size and text width)."""

    patch_size: int = doc(2, "Side in grid cells (pixels or latent cells) of one token's patch.")
    depth: int = doc(4, "Transformer blocks (self-attention, T5 cross-attention, MLP each).")
    width: int = doc(96, "Token width (= heads * head width); a super-resolution DiT needs it divisible by 3 "
                         "(PixArt splits its size embedding in three).")
    heads: int = doc(2, "Attention heads per block; must divide width.")
    dropout: float = doc(0.0, "Dropout probability in attention and MLP.")

    def __post_init__(self) -> None:
        check(self.patch_size >= 1, "model.dit.patch_size", f"must be >= 1, got {self.patch_size}")
        check(self.depth >= 1, "model.dit.depth", f"must be >= 1, got {self.depth}")
        check(self.heads >= 1 and self.width % self.heads == 0, "model.dit.heads",
              f"({self.heads}) must be >= 1 and divide model.dit.width ({self.width})")
        check(0.0 <= self.dropout < 1.0, "model.dit.dropout", f"must be in [0, 1), got {self.dropout}")


def dit_kwargs(cfg: DiTConfig, *, sample_size: int, in_channels: int, out_channels: int, text_dim: int,
               low_res_channels: int = 0, level_conditioned: bool = False) -> dict:
    """The ``PixArtTransformer2DModel`` constructor arguments (also its exported config.json)."""
    if sample_size % cfg.patch_size:
        raise ValueError(f"the DiT's sample side {sample_size} must be divisible by its patch size {cfg.patch_size}")
    if level_conditioned and cfg.width % 3:
        raise ValueError(f"a super-resolution DiT needs model.dit.width divisible by 3, got {cfg.width}")
    return {
        "num_attention_heads": cfg.heads, "attention_head_dim": cfg.width // cfg.heads,
        "in_channels": in_channels + low_res_channels, "out_channels": out_channels, "num_layers": cfg.depth,
        "dropout": cfg.dropout, "cross_attention_dim": cfg.width, "attention_bias": True,
        "sample_size": sample_size, "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
        "norm_eps": 1e-6, "use_additional_conditions": level_conditioned, "caption_channels": text_dim,
    }


def build_dit(cfg: DiTConfig, *, sample_size: int, in_channels: int, out_channels: int, text_dim: int,
              low_res_channels: int = 0, level_conditioned: bool = False) -> nn.Module:
    """A freshly initialised ``diffusers.PixArtTransformer2DModel`` (on the current default device, e.g. meta)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**dit_kwargs(cfg, sample_size=sample_size, in_channels=in_channels,
                                                 out_channels=out_channels, text_dim=text_dim,
                                                 low_res_channels=low_res_channels,
                                                 level_conditioned=level_conditioned))


def dit_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, inputs: dict[str, torch.Tensor], *,
                super_res: bool = False) -> torch.Tensor:
    """One DiT call under the convention above; a `super_res` DiT (built with low-res channels and
    level_conditioned) also reads "low_res" and "level" from `inputs`. `model` may be wrapped (DeepSpeed engine,
    torch.compile): only its forward is used.

    Returns (B, C_out, H, W) in the model's dtype.
    """
    sample = torch.cat([x_t, inputs["low_res"].to(x_t.dtype)], dim=1) if super_res else x_t
    added = {"resolution": None, "aspect_ratio": None}
    if super_res:
        batch = x_t.shape[0]
        side = torch.tensor(x_t.shape[-2:], dtype=torch.float32, device=x_t.device)
        added = {"resolution": side.expand(batch, 2),
                 "aspect_ratio": (inputs["level"].to(torch.float32) * LEVEL_SCALE).reshape(batch, 1)}
    return model(sample, encoder_hidden_states=inputs["text"], timestep=t, added_cond_kwargs=added,
                 encoder_attention_mask=inputs["mask"]).sample
