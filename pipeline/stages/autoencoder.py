"""The `autoencoder` stage: a KL or VQ latent autoencoder (diffusers) against our PatchGAN, two parts through the
one Trainer: "generator" (:class:`~pipeline.models.autoencoder.Autoencoder`) then "discriminator".

Generator loss (per micro-batch): L1 or L2 reconstruction (+ perceptual) + KL or VQ commitment + once the GAN is on
``disc_weight * lambda * G(D(x_hat))`` with the VQGAN adaptive weight lambda. The whole loss is computed inside the
generator engine's forward (the module calls the stage's objective): ``torch.autograd.grad`` for lambda must not
run through the engine's outputs, on which DeepSpeed hooks its backward prologue (at ZeRO-0 it even refuses a
backward it did not start). Discriminator loss: on the real batch and the generator step's detached
reconstructions, times 0 until ``loss.disc_start_step`` (its engine must still backward/step every step, and a
zero-weighted loss keeps that a valid graph with exactly zero gradients).

Statistics reduced across ranks with one all-reduce per generator micro-batch (the stage's own collective, as
CLIP's gather lives in its loss): the latent moments that give the exported scaling/shift factors and, for VQ,
per-code counts and sums of the EMA codebook. Dead codes are re-initialised from rank 0's encoder outputs
(broadcast), so every rank's buffers stay identical. Step-dependent behaviour reads the optimizer step from the
generator's ``micro_steps`` buffer, which is checkpointed: a resume across the discriminator start is exact.

Evaluation (held-out): PSNR / SSIM of deterministic reconstructions in [0, 1], KL per latent element or codebook
usage/perplexity, and the scaled latents' mean, second moment and std. Export: a diffusers ``save_pretrained``
folder with scaling_factor (and KL shift_factor) in its config.json, plus t2i_stage.json.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline.bundle import STAGE_META
from pipeline.config import Config
from pipeline.config_schema import check, doc, to_dict
from pipeline.data.spec import SampleSpec
from pipeline.errors import ConfigError, PipelineError
from pipeline.eval.reconstruction import reconstruction_sums, to_unit
from pipeline.models.attention import ATTENTION_BACKENDS
from pipeline.models.diffusers_attention import install_attention
from pipeline.models.autoencoder import (Autoencoder, AutoencoderConfig, AutoencoderOutput, LatentCodec,
                                         build_autoencoder, codebook_usage, load_autoencoder)
from pipeline.models.discriminator import (DiscriminatorConfig, LossConfig, PatchDiscriminator, PerceptualLoss,
                                           adaptive_weight, discriminator_loss, generator_loss)
from pipeline.train.stage import EvalSums, MetricSums, Stage, StageContext, StepOutput
from pipeline.train.weights import checkpoint_config, restore_stage

log = logging.getLogger(__name__)
COMPONENT = "autoencoder"


@dataclass(frozen=True)
class AutoencoderStageConfig:
    """The `model:` section of a `stage: autoencoder` config."""

    autoencoder: AutoencoderConfig = doc(AutoencoderConfig(), "The autoencoder (generator part).")
    discriminator: DiscriminatorConfig = doc(DiscriminatorConfig(), "The PatchGAN (discriminator part).")
    loss: LossConfig = doc(LossConfig(), "Reconstruction, perceptual and GAN losses and their schedule.")
    attention: Literal["sdpa", "triton", "xformers"] = doc("sdpa", "Kernel of the mid-block attentions.")
    grid_images: int = doc(8, "Held-out images in the periodic grid (each shown as input | reconstruction).")
    train_window: int = doc(0, "Side in pixels of the random square window of each training image the autoencoder "
                               "and the discriminator train on (0: the whole data.resolution image). A convolutional "
                               "autoencoder learns the same local mapping from windows at a fraction of the cost "
                               "(Stable Diffusion's autoencoder trained on 256 px crops of larger images); "
                               "evaluation, latent statistics' use and export see whole images. Must be divisible "
                               "by the downsampling factor; needs mid_attention off (attention sees the whole image).")

    def __post_init__(self) -> None:
        check(self.attention in ATTENTION_BACKENDS, "model.attention", f"must be one of {ATTENTION_BACKENDS}")
        check(self.grid_images >= 0, "model.grid_images", f"must be >= 0, got {self.grid_images}")
        check(self.train_window >= 0, "model.train_window", f"must be >= 0, got {self.train_window}")
        check(self.train_window % self.autoencoder.factor == 0, "model.train_window",
              f"({self.train_window}) must be divisible by the downsampling factor {self.autoencoder.factor}")
        check(not (self.train_window and self.autoencoder.mid_attention), "model.train_window",
              "needs model.autoencoder.mid_attention off: the mid-block attention relates the whole image, so "
              "windows would train it on a different context than it sees at encoding time")


@dataclass
class _Stash:
    """What the generator step leaves for the discriminator step of the same micro-batch."""

    real: torch.Tensor  # (B, 3, H, W) the images the generator reconstructed (windows with model.train_window)
    fake: torch.Tensor  # (B, 3, H, W) detached reconstructions
    gan_on: bool


def random_windows(images: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, side, side): an independent uniformly placed window of each image. Offsets come from
    torch's global generator, whose state every checkpoint keeps, so a resumed run draws the same windows."""
    b, _, h, w = images.shape
    top = torch.randint(0, h - side + 1, (b,)).tolist()
    left = torch.randint(0, w - side + 1, (b,)).tolist()
    return torch.stack([image[:, y:y + side, x:x + side] for image, y, x in zip(images, top, left)])


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module of a DeepSpeed engine (or the module itself)."""
    return model.module if hasattr(model, "zero_optimization_stage") else model


class AutoencoderStage(Stage):
    """Trains "generator" (the autoencoder) and "discriminator" (PatchGAN), in that order, on each micro-batch."""

    name = "autoencoder"
    model_config_cls = AutoencoderStageConfig

    def __init__(self, cfg: Config, ctx: StageContext) -> None:
        super().__init__(cfg, ctx)
        self.mcfg: AutoencoderStageConfig = cfg.model
        self.resolution = cfg.data.resolution
        ae, disc = self.mcfg.autoencoder, self.mcfg.discriminator
        if self.resolution % ae.factor:
            raise ConfigError(f"data.resolution ({self.resolution}) must be divisible by the autoencoder's "
                              f"downsampling factor {ae.factor} (model.autoencoder.block_widths)")
        if self.mcfg.train_window > self.resolution:
            raise ConfigError(f"model.train_window ({self.mcfg.train_window}) is larger than data.resolution "
                              f"({self.resolution})")
        self.train_side = self.mcfg.train_window or self.resolution
        if self.train_side < 3 * 2 ** disc.layers:
            raise ConfigError(f"{'model.train_window' if self.mcfg.train_window else 'data.resolution'} "
                              f"({self.train_side}) is too small for model.discriminator.layers={disc.layers}: the "
                              f"PatchGAN needs at least {3 * 2 ** disc.layers} px")
        if cfg.train.activation_checkpointing and ae.kind == "vq":
            raise ConfigError("train.activation_checkpointing: diffusers' VQModel does not support gradient "
                              "checkpointing; switch it off or use model.autoencoder.kind: kl")
        self.zero3 = cfg.dist.zero_stage == 3
        self.stash: _Stash | None = None
        self.logged_fixed_weight = False

    # ------------------------------------------------------------------------------------------ build
    def sample_spec(self) -> SampleSpec:
        return SampleSpec(image_size=self.resolution, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

    def input_paths(self) -> dict[str, str]:
        path = self.mcfg.loss.perceptual_path
        return {"model.loss.perceptual_path": path} if path else {}

    def build_trainable(self) -> dict[str, nn.Module]:
        generator = build_autoencoder(self.mcfg.autoencoder, self.resolution)
        if self.mcfg.autoencoder.mid_attention:
            install_attention(generator.vae, self.mcfg.attention)
        if self.cfg.train.activation_checkpointing:
            generator.vae.enable_gradient_checkpointing()
        return {"generator": generator, "discriminator": PatchDiscriminator(self.mcfg.discriminator)}

    def build_frozen(self) -> dict[str, nn.Module]:
        path = self.mcfg.loss.perceptual_path
        if not path:
            return {}
        try:
            return {"perceptual": PerceptualLoss(path)}
        except ValueError as exc:
            raise ConfigError(f"model.loss.perceptual_path: {exc}") from None

    # ----------------------------------------------------------------------------------------- train
    def training_step(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], batch: dict,
                      part: str) -> StepOutput:
        if part == "generator":
            return self._generator_step(models, frozen, batch)
        return self._discriminator_step(models["discriminator"], batch)

    def _generator_step(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                        batch: dict) -> StepOutput:
        engine = models["generator"]
        ae: Autoencoder = _unwrap(engine)
        step = int(ae.micro_steps) // self.cfg.train.grad_accum_steps + 1  # the optimizer step being taken
        gan_on = step > self.mcfg.loss.disc_start_step
        images = batch["image"]
        if self.mcfg.train_window:
            images = random_windows(images, self.mcfg.train_window)
        kept: dict[str, AutoencoderOutput] = {}

        def objective(out: AutoencoderOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            kept["out"] = out
            return self._generator_loss(out, images, ae, models["discriminator"], frozen.get("perceptual"), gan_on)

        loss, metrics = engine(images, objective=objective)
        out = kept["out"]
        with torch.no_grad():
            ae.micro_steps += 1
            metrics.update(self._update_statistics(ae, out, step))
        self.stash = _Stash(images, out.recon.detach(), gan_on)
        return StepOutput(loss, metrics)

    def _generator_loss(self, out: AutoencoderOutput, images: torch.Tensor, ae: Autoencoder, disc: nn.Module,
                        perceptual: nn.Module | None, gan_on: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and detached metrics; runs inside the generator's forward (see the module docstring)."""
        lcfg = self.mcfg.loss
        diff = out.recon.float() - images.float()
        rec = diff.abs().mean() if lcfg.reconstruction == "l1" else diff.pow(2).mean()
        nll = rec
        metrics = {"rec_loss": rec.detach()}
        if perceptual is not None:
            p_loss = perceptual(out.recon, images)
            nll = nll + lcfg.perceptual_weight * p_loss
            metrics["perceptual_loss"] = p_loss.detach()
        if self.mcfg.autoencoder.kind == "kl":
            loss = nll + self.mcfg.autoencoder.kl_weight * out.reg_loss
            metrics["kl_loss"] = out.reg_loss.detach()
        else:
            loss = nll + out.reg_loss  # the commitment loss is already weighted
            metrics["vq_loss"] = out.reg_loss.detach()
        gan = torch.zeros((), device=loss.device)
        adaptive = torch.zeros((), device=loss.device)
        if gan_on:  # before the start the discriminator is not even run for the generator
            gan = generator_loss(disc(out.recon), lcfg.gan)
            adaptive = self._adaptive_weight(nll, gan, ae)
            loss = loss + lcfg.disc_weight * adaptive * gan
        metrics.update(gan_loss=gan.detach(), adaptive_weight=adaptive, gan_weight=lcfg.disc_weight * adaptive)
        return loss, metrics

    def _adaptive_weight(self, nll: torch.Tensor, gan: torch.Tensor, ae: Autoencoder) -> torch.Tensor:
        """The VQGAN gradient-norm ratio (0-dim, detached), or 1 where it is off or impossible (ZeRO-3)."""
        lcfg = self.mcfg.loss
        one = torch.ones((), device=nll.device)
        if not lcfg.adaptive_weight or not gan.requires_grad:
            return one
        if self.zero3:
            if not self.logged_fixed_weight and self.ctx.rank == 0:
                log.warning("ZeRO-3 partitions the decoder's last layer, so the adaptive GAN weight cannot be "
                            "computed: using the fixed model.loss.disc_weight=%g", lcfg.disc_weight)
            self.logged_fixed_weight = True
            return one
        return adaptive_weight(nll, gan, ae.last_layer(), lcfg.adaptive_weight_max)

    def _discriminator_step(self, disc: nn.Module, batch: dict) -> StepOutput:
        if self.stash is None:
            raise PipelineError("the autoencoder stage's discriminator stepped before its generator; the parts must "
                                "step in the order generator, discriminator")
        real = self.stash.real
        logits = disc(torch.cat([real, self.stash.fake.to(real.dtype)])).float()
        logits_real, logits_fake = logits.chunk(2)
        loss = discriminator_loss(logits_real, logits_fake, self.mcfg.loss.gan)
        factor = 1.0 if self.stash.gan_on else 0.0  # a valid graph with exactly zero gradients before the start
        metrics = {"disc_loss": loss.detach(), "logits_real": logits_real.mean().detach(),
                   "logits_fake": logits_fake.mean().detach()}
        return StepOutput(loss * factor, metrics)

    # ------------------------------------------------------------------------------------ statistics
    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size > 1:
            import torch.distributed as tdist

            tdist.all_reduce(tensor)
        return tensor

    def _update_statistics(self, ae: Autoencoder, out: AutoencoderOutput, step: int) -> dict[str, float]:
        """Latent moments (+ VQ codebook) from every rank's micro-batch, reduced in one all-reduce."""
        z = out.latent.detach().double()
        moments = torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64, device=z.device),
                               z.sum(), z.pow(2).sum()])
        if out.indices is None:
            ae.update_latent_moments(self._all_reduce(moments))
            return {}
        stats = ae.codebook_statistics(out.latent, out.indices)
        packed = self._all_reduce(torch.cat([moments, stats.double().flatten()]))
        ae.update_latent_moments(packed[:3])
        stats = packed[3:].view_as(stats).float()
        dead = ae.update_codebook(stats, step)
        if dead.numel():
            ae.restart_codes(dead, self._restart_vectors(out.latent, dead.numel(), step), step)
        usage, perplexity = codebook_usage(stats[:, 0])
        return {"codebook_usage": usage, "codebook_perplexity": perplexity, "codes_restarted": float(dead.numel())}

    def _restart_vectors(self, latent: torch.Tensor, n: int, step: int) -> torch.Tensor:
        """(n, D) encoder outputs picked at random from rank 0's micro-batch and broadcast, so every rank restarts
        its codes with the same values; the choice uses its own generator (no training RNG stream is touched)."""
        flat = latent.detach().float().permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        rows = torch.randperm(flat.shape[0], generator=gen)[:n] if n <= flat.shape[0] else \
            torch.randint(flat.shape[0], (n,), generator=gen)
        vectors = flat[rows.to(flat.device)].contiguous()
        if self.ctx.world_size > 1:
            import torch.distributed as tdist

            tdist.broadcast(vectors, src=0)
        return vectors

    # -------------------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                 batches: Iterable[dict]) -> EvalSums:
        ae: Autoencoder = models["generator"]
        scale, shift = ae.scale_shift()
        sums = MetricSums()
        for batch in batches:
            images = batch["image"]
            out = ae.run(images, sample=False)
            found = dict(reconstruction_sums(images, out.recon))
            n = float(images.shape[0])
            scaled = (out.latent.double() - shift) * scale
            count = float(scaled.numel())
            found.update(latent_mean=(float(scaled.sum()), count),
                         latent_second_moment=(float(scaled.pow(2).sum()), count),
                         latent_std=(float(scaled.std(unbiased=False)) * n, n))  # per-batch std, batch-weighted
            if out.logvar is not None:
                kl = 0.5 * (out.latent.double() ** 2 + out.logvar.double().exp() - 1.0 - out.logvar.double())
                found["kl_per_latent"] = (float(kl.sum()), float(kl.numel()))
            else:
                usage, perplexity = codebook_usage(torch.bincount(out.indices, minlength=ae.cfg.codebook_size))
                found.update(codebook_usage=(usage, 1.0), codebook_perplexity=(perplexity, 1.0))
            sums.merge(found)
        return sums.sums()

    @torch.no_grad()
    def sample_images(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], seed: int,
                      batch: dict | None = None) -> torch.Tensor | None:
        """(N, 3, H, 2W) in [0, 1]: each held-out image with its reconstruction on the right."""
        if batch is None or not self.mcfg.grid_images:
            return None
        images = batch["image"][:self.mcfg.grid_images]
        recon = models["generator"].run(images, sample=False).recon
        return to_unit(torch.cat([images.float(), recon.float()], dim=3)).cpu()

    # ---------------------------------------------------------------------------------------- export
    def component_name(self) -> str:
        return COMPONENT

    def export(self, modules: Mapping[str, nn.Module], out_dir: Path) -> None:
        """A diffusers folder (``AutoencoderKL``/``VQModel.from_pretrained`` loads it) with the latent scaling in its
        config.json, and t2i_stage.json (our facts: kind, factor, latent shape, the stage config)."""
        ae: Autoencoder = modules["generator"]
        vae = ae.finalised_vae()
        out_dir.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(str(out_dir), safe_serialization=True)
        cfg = self.mcfg.autoencoder
        side = self.resolution // cfg.factor
        scale, shift = ae.scale_shift()
        stage = {"stage": self.name, "kind": cfg.kind, "resolution": self.resolution,
                 "downsampling_factor": cfg.factor, "latent_shape": [cfg.latent_channels, side, side],
                 "scaling_factor": scale, "shift_factor": shift, "model": to_dict(self.mcfg)}
        (out_dir / STAGE_META).write_text(json.dumps(stage, indent=2) + "\n", encoding="utf-8")


def load_codec(path: str | Path, use_ema: bool = True) -> LatentCodec:
    """A frozen :class:`LatentCodec` (eval mode, no gradients, CPU, fp32) from an exported autoencoder folder, a
    bundle holding one, or an autoencoder run dir / checkpoint dir, whose checkpoint (latest, or the one named) is
    consolidated in memory exactly as ``python -m pipeline export`` would (EMA weights when the run keeps them and
    `use_ema`). The caller's RNG streams are left untouched."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / COMPONENT / "config.json").is_file():
        path = path / COMPONENT  # a bundle root
    if (path / "config.json").is_file():
        return load_autoencoder(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such autoencoder (expected an exported folder with config.json, or an "
                          f"autoencoder run directory)")
    _, cfg = checkpoint_config(path)
    if cfg.stage != AutoencoderStage.name:
        raise ConfigError(f"{path}: a {cfg.stage!r} run, not an autoencoder run")
    generator: Autoencoder = restore_stage(path, use_ema=use_ema).modules["generator"]
    codec = LatentCodec(generator.finalised_vae())
    codec.requires_grad_(False)
    return codec.eval()
