"""The latent autoencoder: diffusers' ``AutoencoderKL`` (KL) or ``VQModel`` (VQ) built from a typed config, the
training state that lives next to it, and :class:`LatentCodec`, the one way every consumer encodes and decodes.

:class:`Autoencoder` (the trainable "generator" part) holds the diffusers model as ``.vae`` plus buffers (so they
are checkpointed with the weights, and identical on every rank because the stage reduces what feeds them):

- ``micro_steps`` (int64): training micro-batches seen; the stage derives the optimizer step from it (the
  discriminator start and code restarts depend on it, and a resumed run must agree).
- ``latent_moments`` (float64 [w, E z, E z^2]): exponential moving moments of the deterministic latents seen in
  training (KL: posterior mean; VQ: pre-quantisation latent), decay ``latent_stats_decay`` per micro-batch, with
  weight ``w`` for bias correction. The Trainer has no "before training" hook, and a latent scale estimated once
  at the start goes stale as the encoder learns; the moving moments follow the encoder. At export they become
  diffusers' config: KL ``shift_factor = E z``, ``scaling_factor = 1 / std z``; VQ (``VQModel`` has no shift)
  ``scaling_factor = 1 / sqrt(E z^2)``. Scaled latents ``(z - shift) * scale`` then have unit variance.
- VQ only: an EMA codebook (van den Oord et al. 2017, appendix; Razavi et al. 2019). ``quantize.embedding.weight``
  is turned from a parameter into a buffer, updated from cluster counts and sums that the stage all-reduces over
  ranks (``code_count``, ``code_sum``), with Laplace smoothing. Why not a gradient-trained codebook with restarts:
  under ZeRO 1-3 the optimizer owns fp32 master copies of every parameter, so a restart written into the
  parameter would be overwritten at the next step; buffers are never partitioned or mastered, so in-place
  updates hold at every ZeRO stage. ``code_last_used`` (int64 step) drives dead-code restarts: a code unused for
  ``restart_after_steps`` steps is re-initialised from a random current encoder output that rank 0 picks and
  broadcasts (the stage does it), so every rank writes the same values. Encoder outputs are pulled to the codes
  by the commitment loss ``commitment_weight * mean((h - sg[q])^2)``; the codebook gets no gradient.

Pure model code: no torch.distributed here (the stage owns the reductions).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config_schema import check, doc
from pipeline.errors import ConfigError
from pipeline.models.loading import load_diffusers_strict

FACTORS = (4, 8, 16)
LAPLACE_EPS = 1e-5


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and regularisation of the autoencoder (the stage gives it the image size)."""

    kind: Literal["kl", "vq"] = doc("kl", "'kl': AutoencoderKL, diagonal Gaussian posterior (sampled in training, "
                                          "its mean when encoding); 'vq': VQModel with an EMA codebook.")
    block_widths: tuple[int, ...] = doc((64, 128, 256), "Channels per level; downsampling factor "
                                                        "f = 2^(levels - 1), which must be 4, 8 or 16.")
    layers_per_block: int = doc(1, "ResNet layers per encoder level (the decoder has one more, as in diffusers).")
    latent_channels: int = doc(4, "Channels of the latent (B, C, H/f, W/f).")
    norm_groups: int = doc(32, "GroupNorm groups; must divide every block width.")
    mid_attention: bool = doc(True, "Self-attention in the encoder's and decoder's middle block.")
    kl_weight: float = doc(1e-6, "KL: weight of KL(q(z|x) || N(0, I)) summed over latent elements and divided by "
                                 "the image's 3*H*W values (so it matches LDM's weight for their per-image "
                                 "summed L1, e.g. 1e-6).")
    codebook_size: int = doc(1024, "VQ: number of codes.")
    codebook_dim: int = doc(0, "VQ: width of a code (the quant_conv output); 0 = latent_channels.")
    commitment_weight: float = doc(0.25, "VQ: weight beta of the commitment loss mean((h - sg[q])^2).")
    codebook_decay: float = doc(0.99, "VQ: EMA decay of the codebook's cluster counts and sums per micro-batch.")
    restart_after_steps: int = doc(100, "VQ: a code unused for this many optimizer steps is re-initialised from a "
                                        "random current encoder output (0 = never).")
    latent_stats_decay: float = doc(0.99, "Decay per micro-batch of the moving latent moments that give the "
                                          "exported scaling_factor/shift_factor.")

    def __post_init__(self) -> None:
        key = "model.autoencoder"
        check(len(self.block_widths) >= 1 and all(w > 0 for w in self.block_widths), f"{key}.block_widths",
              f"must be a non-empty list of positive widths, got {list(self.block_widths)}")
        check(self.factor in FACTORS, f"{key}.block_widths", f"has {len(self.block_widths)} levels, i.e. a "
              f"downsampling factor {self.factor}; use 3, 4 or 5 levels (f = 4, 8 or 16)")
        check(self.layers_per_block > 0, f"{key}.layers_per_block", f"must be > 0, got {self.layers_per_block}")
        check(self.latent_channels > 0, f"{key}.latent_channels", f"must be > 0, got {self.latent_channels}")
        check(self.norm_groups > 0 and all(w % self.norm_groups == 0 for w in self.block_widths),
              f"{key}.norm_groups", f"({self.norm_groups}) must divide every block width {list(self.block_widths)}")
        check(self.kl_weight >= 0, f"{key}.kl_weight", f"must be >= 0, got {self.kl_weight}")
        check(self.codebook_size >= 2, f"{key}.codebook_size", f"must be >= 2, got {self.codebook_size}")
        check(self.codebook_dim >= 0, f"{key}.codebook_dim", f"must be >= 0, got {self.codebook_dim}")
        check(self.commitment_weight >= 0, f"{key}.commitment_weight", f"must be >= 0, got {self.commitment_weight}")
        for name in ("codebook_decay", "latent_stats_decay"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"{key}.{name}", f"must be in [0, 1), got {value}")
        check(self.restart_after_steps >= 0, f"{key}.restart_after_steps",
              f"must be >= 0, got {self.restart_after_steps}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_widths) - 1)

    @property
    def code_dim(self) -> int:
        return self.codebook_dim or self.latent_channels


def diffusers_kwargs(cfg: AutoencoderConfig, sample_size: int) -> dict:
    """Constructor arguments of ``AutoencoderKL`` / ``VQModel`` (also what their exported config.json holds)."""
    levels = len(cfg.block_widths)
    kwargs = {"in_channels": 3, "out_channels": 3, "block_out_channels": tuple(cfg.block_widths),
              "down_block_types": ("DownEncoderBlock2D",) * levels, "up_block_types": ("UpDecoderBlock2D",) * levels,
              "layers_per_block": cfg.layers_per_block, "act_fn": "silu", "latent_channels": cfg.latent_channels,
              "norm_num_groups": cfg.norm_groups, "sample_size": sample_size, "scaling_factor": 1.0,
              "mid_block_add_attention": cfg.mid_attention}
    if cfg.kind == "kl":
        kwargs["shift_factor"] = 0.0
    else:
        kwargs.update(num_vq_embeddings=cfg.codebook_size, vq_embed_dim=cfg.code_dim)
    return kwargs


@dataclass
class AutoencoderOutput:
    """One training forward pass on (B, 3, H, W) images in [-1, 1] (latent grid h = H/f, w = W/f).

    recon: (B, 3, H, W) decoder output. latent: (B, C, h, w) deterministic latent (KL posterior mean, VQ
    pre-quantisation h), unscaled. logvar: (B, C, h, w) KL posterior log-variance, None for VQ. indices: (B*h*w,)
    int64 code of every latent position (VQ), None for KL. reg_loss: scalar, KL term (see kl_weight's doc, not yet
    weighted) or the weighted VQ commitment loss.
    """

    recon: torch.Tensor
    latent: torch.Tensor
    logvar: torch.Tensor | None
    indices: torch.Tensor | None
    reg_loss: torch.Tensor


class Autoencoder(nn.Module):
    """The trainable part: ``.vae`` (the diffusers model) plus the training state buffers described above."""

    def __init__(self, cfg: AutoencoderConfig, sample_size: int) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, VQModel

        self.cfg = cfg
        kwargs = diffusers_kwargs(cfg, sample_size)
        self.vae = AutoencoderKL(**kwargs) if cfg.kind == "kl" else VQModel(**kwargs)
        self.register_buffer("micro_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("latent_moments", torch.zeros(3, dtype=torch.float64))
        if cfg.kind == "vq":
            embedding = self.vae.quantize.embedding
            codebook = embedding.weight.detach().float().clone()
            del embedding.weight  # parameter -> buffer (why: module docstring); same state_dict key
            embedding.register_buffer("weight", codebook)
            self.register_buffer("code_count", torch.ones(cfg.codebook_size))
            self.register_buffer("code_sum", codebook.clone())
            self.register_buffer("code_last_used", torch.zeros(cfg.codebook_size, dtype=torch.int64))

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor,
                objective: Callable[[AutoencoderOutput], Any] | None = None) -> AutoencoderOutput | Any:
        """Training pass of (B, 3, H, W) images in [-1, 1] -> :class:`AutoencoderOutput`, or ``objective(output)``
        when given (a stage's loss, so it is computed inside this forward: see the stage's docstring)."""
        out = self.run(images, sample=self.training)
        return out if objective is None else objective(out)

    def run(self, images: torch.Tensor, sample: bool) -> AutoencoderOutput:
        """Encode, (sample or quantise,) decode. `sample`: KL draws z from the posterior, else uses its mean."""
        if self.cfg.kind == "kl":
            posterior = self.vae.encode(images).latent_dist
            z = posterior.sample() if sample else posterior.mean
            recon = self.vae.decode(z).sample
            kl = 0.5 * (posterior.mean.float() ** 2 + posterior.var.float() - 1.0 - posterior.logvar.float())
            reg = kl.flatten(1).sum(dim=1).mean() / float(images[0].numel())
            return AutoencoderOutput(recon, posterior.mean, posterior.logvar, None, reg)
        h = self.vae.encode(images).latents
        quantised, indices = self.quantise(h)
        # straight-through: gradients of the decoder input reach h unchanged
        z_q = h + (quantised - h).detach()
        commit = self.cfg.commitment_weight * F.mse_loss(h.float(), quantised.float())
        recon = self.vae.decode(z_q, force_not_quantize=True).sample
        return AutoencoderOutput(recon, h, None, indices, commit)

    def quantise(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) -> nearest codes (B, D, h, w) in h's dtype, detached, and their indices (B*h*w,), through
        diffusers' VectorQuantizer (in fp32: the codebook buffer stays fp32 under bf16 training)."""
        quantised, _, (_, _, indices) = self.vae.quantize(h.float())
        return quantised.detach().to(h.dtype), indices.reshape(-1)

    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight: where the adaptive GAN weight compares gradient norms."""
        return self.vae.decoder.conv_out.weight

    # ---------------------------------------------------------------------------------- latent scaling
    @torch.no_grad()
    def update_latent_moments(self, batch_moments: torch.Tensor) -> None:
        """Fold one micro-batch's (all-ranks) [count, sum z, sum z^2] (float64) into the moving moments."""
        count = float(batch_moments[0])
        if count <= 0:
            return
        d = self.cfg.latent_stats_decay
        step = torch.stack([torch.ones((), dtype=torch.float64, device=batch_moments.device),
                            batch_moments[1] / count, batch_moments[2] / count])
        self.latent_moments.mul_(d).add_(step.to(self.latent_moments.device), alpha=1.0 - d)

    def scale_shift(self) -> tuple[float, float]:
        """(scaling_factor, shift_factor) from the moving moments; (1, 0) before any training step."""
        w, m1, m2 = (float(v) for v in self.latent_moments)
        if w <= 0:
            return 1.0, 0.0
        mean, second = m1 / w, m2 / w
        if self.cfg.kind == "vq":  # VQModel has no shift: scale the second moment about 0
            return 1.0 / math.sqrt(max(second, 1e-12)), 0.0
        return 1.0 / math.sqrt(max(second - mean * mean, 1e-12)), mean

    def finalised_vae(self) -> nn.Module:
        """``.vae`` with scaling_factor (and KL shift_factor) written into its config, for export."""
        scale, shift = self.scale_shift()
        if self.cfg.kind == "kl":
            self.vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        else:
            self.vae.register_to_config(scaling_factor=scale)
        return self.vae

    # ------------------------------------------------------------------------------------ EMA codebook
    @torch.no_grad()
    def codebook_statistics(self, h: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """(K, 1 + D) float32: per code, how many latent vectors chose it and their sum (this rank's batch)."""
        flat = h.detach().float().permute(0, 2, 3, 1).reshape(-1, self.cfg.code_dim)
        stats = torch.zeros(self.cfg.codebook_size, 1 + self.cfg.code_dim, device=flat.device)
        stats[:, 0].index_add_(0, indices, torch.ones_like(indices, dtype=torch.float32))
        stats[:, 1:].index_add_(0, indices, flat)
        return stats

    @torch.no_grad()
    def update_codebook(self, stats: torch.Tensor, step: int) -> torch.Tensor:
        """Fold all-ranks statistics (K, 1 + D) into the EMA codebook; returns the codes to restart (int64)."""
        d = self.cfg.codebook_decay
        counts, sums = stats[:, 0].to(self.code_count), stats[:, 1:].to(self.code_sum)
        self.code_count.mul_(d).add_(counts, alpha=1.0 - d)
        self.code_sum.mul_(d).add_(sums, alpha=1.0 - d)
        total = self.code_count.sum()
        smoothed = (self.code_count + LAPLACE_EPS) / (total + self.cfg.codebook_size * LAPLACE_EPS) * total
        self.vae.quantize.embedding.weight.copy_(self.code_sum / smoothed[:, None])
        self.code_last_used[counts > 0] = step
        if not self.cfg.restart_after_steps:
            return torch.zeros(0, dtype=torch.int64, device=counts.device)
        return torch.nonzero(step - self.code_last_used >= self.cfg.restart_after_steps).flatten()

    @torch.no_grad()
    def restart_codes(self, codes: torch.Tensor, vectors: torch.Tensor, step: int) -> None:
        """Codes (n,) take new values (n, D); their EMA restarts as one fresh observation."""
        vectors = vectors.float().to(self.code_sum.device)
        self.vae.quantize.embedding.weight[codes] = vectors
        self.code_sum[codes] = vectors
        self.code_count[codes] = 1.0
        self.code_last_used[codes] = step


def codebook_usage(counts: torch.Tensor) -> tuple[float, float]:
    """(fraction of codes used, perplexity exp(H(p))) of per-code counts (K,)."""
    total = float(counts.sum())
    if total <= 0:
        return 0.0, 0.0
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


def build_autoencoder(cfg: AutoencoderConfig, sample_size: int) -> Autoencoder:
    """A freshly initialised :class:`Autoencoder` (on the current default device, e.g. meta)."""
    return Autoencoder(cfg, sample_size)


class LatentCodec(nn.Module):
    """Images <-> scaled latents with a diffusers autoencoder and its config's scaling_factor / shift_factor.

    ``scaled = (z - shift_factor) * scaling_factor`` (diffusers' SD3/Flux convention; SD 1.x is shift 0), where z
    is the KL posterior mean (deterministic) or the VQ pre-quantisation latent; decoding divides, adds the shift
    and (VQ) quantises. A frozen helper: the Trainer may move it to a device and compute dtype.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.kind = "vq" if hasattr(vae, "quantize") else "kl"
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.latent_channels = int(vae.config.latent_channels)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(vae.config.sample_size)

    def latent_distribution(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> scaled (mean, std), each (B, C, H/f, W/f); std is 0 for VQ."""
        if self.kind == "kl":
            posterior = self.vae.encode(images).latent_dist
            return (posterior.mean - self.shift) * self.scale, posterior.std * self.scale
        h = self.vae.encode(images).latents
        return (h - self.shift) * self.scale, torch.zeros_like(h)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), deterministic."""
        return self.latent_distribution(images)[0]

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), clamped to [-1, 1] unless `clamp` is False."""
        z = latents / self.scale + self.shift
        images = self.vae.decode(z).sample
        return images.clamp(-1.0, 1.0) if clamp else images

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LatentCodec:
        """An exported component folder (diffusers config.json + safetensors), AutoencoderKL or VQModel."""
        from diffusers import AutoencoderKL, VQModel

        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        classes = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
        name = config.get("_class_name")
        if name not in classes:
            raise ValueError(f"{folder}/config.json: _class_name {name!r} is not AutoencoderKL or VQModel")
        return cls(load_diffusers_strict(classes[name], Path(folder))).eval()  # a config/weights mismatch fails


def load_autoencoder(folder: str | Path) -> LatentCodec:
    """A frozen :class:`LatentCodec` (eval mode, no gradients, CPU, fp32) from an exported autoencoder component
    folder (diffusers config.json + safetensors). Building it draws initial weights from torch's RNG: the caller's
    stream is left untouched. (A run dir or a bundle root: pipeline.stages.autoencoder.load_codec.)"""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no autoencoder here (expected an exported folder with config.json)")
    with torch.random.fork_rng(devices=[]):
        codec = LatentCodec.from_pretrained(folder)
    codec.requires_grad_(False)
    return codec.eval()
