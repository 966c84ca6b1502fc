"""The `unet` stage: one class for the base and the super-resolution stages of the cascade.

Base stage: images (pixel space, or latents of a frozen autoencoder) + frozen T5 tokens -> denoising loss, with
classifier-free-guidance dropout of the text. Super-resolution stage (``model.super_res.low_res > 0``): the batch
image downsampled to ``low_res`` and brought back to the U-Net's grid is noise-augmented at a random level
(Imagen), concatenated to the noised input, and the level conditions the U-Net through its class embedding; at
sampling the level is ``model.super_res.sample_noise_level``.

Evaluation on held-out shards: the denoising loss per timestep bucket, and prompt fidelity of images sampled for
the held-out captions with and without guidance (synthetic-style captions only; see pipeline/eval/fidelity.py).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.bundle import STAGE_META, describe_files, read_index
from pipeline.config import Config, compile_shapes
from pipeline.config_schema import to_dict
from pipeline.data.buckets import resolve_shapes
from pipeline.data.spec import SampleSpec
from pipeline.data.synthetic import parse_caption
from pipeline.diffusion.objective import cfg_drop, diffusion_loss, random_levels, stratified_timesteps
from pipeline.diffusion.samplers import make_scheduler, scheduler_config
from pipeline.diffusion.schedules import Schedule, build_schedule
from pipeline.errors import ConfigError, PipelineError
from pipeline.eval.fidelity import fidelity_sums
from pipeline.eval.frechet import load_reference_stats
from pipeline.eval.generation import GenerationMetrics, generation_figures, quality_models, sample_id
from pipeline.models.dit import build_dit
from pipeline.models.diffusers_attention import install_attention
from pipeline.models.fused_norm import install_fused_norm
from pipeline.models.unet import Conditioning, build_unet, default_sizes, null_condition, unet_forward
from pipeline.sampling.cascade import CascadeLevel, SamplingConfig, low_res_input, sample_level
from pipeline.stages.autoencoder import load_codec
from pipeline.stages.unet_config import (UNetStageConfig, _is_local, autoencoder_geometry, check_buckets,
                                        text_encoder_dim)
from pipeline.text.t5 import FrozenT5Encoder, T5Tokenize, save_t5
from pipeline.train.stage import EvalSums, MetricSums, Stage, StageContext, StepOutput

BUCKETS = 4  # timestep buckets of the held-out denoising loss


def guidance_dropout(inputs: dict[str, torch.Tensor], mcfg: UNetStageConfig,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Classifier-free-guidance training drops of one batch's conditioning (B samples), from the global RNG.

    An unCLIP stage gets three independent drops, so that every state sampling uses is trained on its own share:
    everything (`cond_drop_prob`: the unconditional branch of guidance), the image embedding alone
    (`image_embed.drop_prob`), the text alone (`image_embed.text_drop_prob`: DALL-E 2 variations). Independent drops
    of text and embedding alone would leave the unconditional branch the product of the two (1% at 0.1 each), too
    rare to learn: guidance then extrapolated from a poor unconditional model (measured on the demo: no gain at
    scale 3, a loss at 5). Size/crop conditioning is dropped with the text only when
    `micro_conditioning.drop_with_text` says so.
    """
    batch = inputs["text"].shape[0]
    embed = bool(mcfg.image_embed.dim)
    text = ("text", "sizes") if mcfg.micro_conditioning.drop_with_text else ("text",)
    inputs = null_condition(inputs, cfg_drop(batch, mcfg.cond_drop_prob, device),
                            keys=(*text, "image_embed") if embed else text)
    if embed:
        inputs = null_condition(inputs, cfg_drop(batch, mcfg.image_embed.drop_prob, device), keys=("image_embed",))
        inputs = null_condition(inputs, cfg_drop(batch, mcfg.image_embed.text_drop_prob, device), keys=text)
    return inputs


class UNetStage(Stage):
    """Trains one part, "unet": a diffusers UNet2DConditionModel (see pipeline/models/unet.py for its inputs), or
    with model.backbone dit a PixArtTransformer2DModel (pipeline/models/dit.py)."""

    name = "unet"
    model_config_cls = UNetStageConfig

    def __init__(self, cfg: Config, ctx: StageContext) -> None:
        super().__init__(cfg, ctx)
        self.mcfg: UNetStageConfig = cfg.model
        self.resolution = cfg.data.resolution
        sr = self.mcfg.super_res
        multiple, why = self._grid_multiple()
        if self.resolution % multiple:
            raise ConfigError(f"data.resolution ({self.resolution}) must be divisible by {multiple} ({why})")
        if sr.low_res and not sr.low_res < self.resolution:
            raise ConfigError(f"model.super_res.low_res ({sr.low_res}) must be smaller than data.resolution "
                              f"({self.resolution}): a super-resolution stage upsamples")
        self.schedule: Schedule = build_schedule(self.mcfg.diffusion, self.resolution)
        make_scheduler(self.schedule, self.mcfg.sampling.sampler)  # sampler settings that cannot work fail now
        self.grid = (3, self.resolution, self.resolution)
        if self.mcfg.space == "latent" and Path(self.mcfg.autoencoder).exists():  # missing: input_paths says so
            channels, factor, _ = autoencoder_geometry(self.mcfg.autoencoder)
            if self.resolution % factor or (self.resolution // factor) % multiple:
                raise ConfigError(f"data.resolution ({self.resolution}) / the autoencoder's factor {factor} must be "
                                  f"a whole latent side divisible by {multiple} ({why})")
            self.grid = (channels, self.resolution // factor, self.resolution // factor)
        if self.mcfg.micro_conditioning.enabled and not cfg.data.buckets.enabled:
            raise ConfigError("model.micro_conditioning.enabled needs data.buckets.enabled: only the bucketed loader "
                              "records each image's original size and crop")
        # the output shapes this stage trains on, recorded in the bundle so that sampling can refuse the others
        self.buckets = resolve_shapes(cfg.data.buckets, self.resolution) if cfg.data.buckets.enabled else ()
        self.dynamic_size = compile_shapes(cfg) == "dynamic"  # train.compile: one graph for all bucket shapes
        if self.buckets and self.mcfg.backbone == "dit":
            raise ConfigError("data.buckets: the dit backbone trains on square images only (not supported yet); "
                              "use model.backbone unet")
        check_buckets(self.buckets, self.resolution, self.resolution // self.grid[1], multiple, why,
                      self.mcfg.super_res.low_res)
        if self.buckets and self.mcfg.space == "latent" and self.mcfg.latent_source == "precomputed" and \
                cfg.data.crop != "center":
            # a latent precomputed per bucket (`shards precompute --buckets-config`) holds the centre crop only
            raise ConfigError(f"data.crop {cfg.data.crop}: precomputed bucketed latents hold one (centre) crop per "
                              f"image; set data.crop: center, or use model.latent_source: encoder")
        self.t5_dim: int | None = None  # known once the T5 (or the first precomputed batch) is seen
        self._quality: tuple | None = None  # eval.num_images: (Inception, CLIP), loaded at the first evaluation

    def _grid_multiple(self) -> tuple[int, str]:
        """What the network's grid side must be a multiple of, and why (for the error message)."""
        if self.mcfg.backbone == "dit":
            return self.mcfg.dit.patch_size, "model.dit.patch_size"
        levels = len(self.mcfg.unet.channel_mult)
        return 2 ** (levels - 1), f"{levels} U-Net levels, model.unet.channel_mult"

    def _grid_shape(self, images: torch.Tensor) -> tuple[int, int]:
        """(h, w) of the U-Net's sample for images (B, 3, H, W): the pixels, or the latent cells."""
        factor = self.resolution // self.grid[1]
        return images.shape[-2] // factor, images.shape[-1] // factor

    # ------------------------------------------------------------------------------------------ build
    def sample_spec(self) -> SampleSpec:
        t5 = self.mcfg.text_encoder
        arrays = ("clip_image_emb",) if self.mcfg.image_embed.dim else ()
        latents = ("latent",) if self.mcfg.space == "latent" and self.mcfg.latent_source == "precomputed" else ()
        arrays = (*arrays, *latents)
        # per-bucket latents: training batches need no image, except a super-resolution stage's low-res input
        decode = not latents or bool(self.mcfg.super_res.low_res)
        if self.mcfg.text_source == "precomputed":
            return SampleSpec(image_size=self.resolution, precomputed=("t5_emb", "t5_mask", *arrays),
                              loss_mask=self.mcfg.loss_mask, per_bucket=latents, decode_image=decode)
        return SampleSpec(image_size=self.resolution, tokenize=T5Tokenize(t5.path, t5.max_length), precomputed=arrays,
                          loss_mask=self.mcfg.loss_mask, per_bucket=latents, decode_image=decode)

    def input_paths(self) -> dict[str, str]:
        paths = {}
        path = self.mcfg.text_encoder.path  # also read with precomputed text: its config gives the T5 width
        if _is_local(path):
            paths["model.text_encoder.path"] = path
        if self.mcfg.image_embed.dim:
            paths["model.image_embed.clip"] = self.mcfg.image_embed.clip
        if self.mcfg.space == "latent":
            paths["model.autoencoder"] = self.mcfg.autoencoder
        if self.cfg.eval.num_images:
            paths.update({f"eval.{k}": v for k in ("inception_weights", "fid_stats", "clip")
                          if (v := getattr(self.cfg.eval, k))})
        return paths

    def conditioning(self, text_dim: int) -> Conditioning:
        sr, micro = self.mcfg.super_res, self.mcfg.micro_conditioning
        return Conditioning(text_dim=text_dim, pooled_text=self.mcfg.unet.pooled_text and self.mcfg.backbone == "unet",
                            image_embed_dim=self.mcfg.image_embed.dim,
                            level_dim=sr.level_embed_dim if sr.low_res else 0,
                            low_res_channels=3 if sr.low_res else 0,
                            size_dim=micro.embed_dim if micro.enabled else 0, backbone=self.mcfg.backbone)

    def _text_dim(self) -> int:
        if self.t5_dim is None:
            self.t5_dim = text_encoder_dim(self.mcfg.text_encoder)
        return self.t5_dim

    def build_trainable(self) -> dict[str, nn.Module]:
        if self.mcfg.backbone == "dit":  # part name "unet" for either backbone: checkpoints, export, bundles
            cond = self.conditioning(self._text_dim())
            dit = build_dit(self.mcfg.dit, sample_size=self.grid[1], in_channels=self.grid[0],
                            out_channels=self.grid[0], text_dim=cond.text_dim, low_res_channels=cond.low_res_channels,
                            level_conditioned=bool(cond.level_dim))
            install_attention(dit, self.mcfg.attention)
            if self.cfg.train.activation_checkpointing:
                dit.enable_gradient_checkpointing()  # one checkpoint per transformer block
            return {"unet": dit}
        unet = build_unet(self.mcfg.unet, sample_size=self.grid[1], in_channels=self.grid[0],
                          out_channels=self.grid[0], cond=self.conditioning(self._text_dim()))
        install_attention(unet, self.mcfg.attention)
        if self.mcfg.unet.fused_norm:
            install_fused_norm(unet, self.mcfg.attention)
        if self.cfg.train.activation_checkpointing:
            unet.enable_gradient_checkpointing()
        return {"unet": unet}

    def build_frozen(self) -> dict[str, nn.Module]:
        frozen: dict[str, nn.Module] = {}
        if self.mcfg.text_source == "encoder":
            frozen["t5"] = FrozenT5Encoder(self.mcfg.text_encoder)
        if self.mcfg.space == "latent":  # also with precomputed latents: evaluation and grids decode
            frozen["autoencoder"] = load_codec(self.mcfg.autoencoder)
        return frozen

    def _x0(self, frozen: Mapping[str, nn.Module], batch: dict) -> torch.Tensor:
        """What the U-Net denoises: the batch images (B, 3, R, R) in pixel space, their scaled latents otherwise."""
        if self.mcfg.space == "pixel":
            return batch["image"]
        if self.mcfg.latent_source == "precomputed":
            return batch["latent"].to(self.ctx.device, non_blocking=True).to(self.ctx.compute_dtype)
        with torch.no_grad():
            return frozen["autoencoder"].encode(batch["image"])

    # ----------------------------------------------------------------------------------------- inputs
    def _text(self, frozen: Mapping[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        """{"text": (B, L, D) compute dtype, zero at padding, "mask": (B, L) bool} on the device."""
        device, dtype = self.ctx.device, self.ctx.compute_dtype
        if self.mcfg.text_source == "precomputed":
            mask = batch["t5_mask"].to(device, non_blocking=True)
            text = batch["t5_emb"].to(device, non_blocking=True).to(dtype) * mask[..., None].to(dtype)
        else:
            mask = batch["t5_mask"].to(device, non_blocking=True)
            text = frozen["t5"](batch["t5_ids"].to(device, non_blocking=True), mask).to(dtype)
        return {"text": text, "mask": mask}

    def _low_res(self, images: torch.Tensor) -> torch.Tensor:
        """The batch images (B, 3, H, W) downsampled by low_res / R: the same bucket at the previous stage's
        resolution (antialiased bicubic, like the loader's PIL resize that made the previous stage's training
        images)."""
        low = self.mcfg.super_res.low_res
        size = (images.shape[-2] * low // self.resolution, images.shape[-1] * low // self.resolution)
        return F.interpolate(images.float(), size=size, mode="bicubic", antialias=True,
                             align_corners=False).clamp(-1.0, 1.0)

    def _inputs(self, frozen: Mapping[str, nn.Module], batch: dict, train: bool,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The U-Net's conditioning for a batch; a super-resolution stage's low-res image is noise-augmented with
        noise from `generator` (None: the global RNG, which training checkpoints)."""
        inputs = self._text(frozen, batch)
        if self.mcfg.image_embed.dim:
            embed = batch["clip_image_emb"].to(self.ctx.device, non_blocking=True)
            if embed.shape[-1] != self.mcfg.image_embed.dim:
                raise ConfigError(f"model.image_embed.dim is {self.mcfg.image_embed.dim} but the precomputed "
                                  f"clip_image_emb arrays have width {embed.shape[-1]}")
            inputs["image_embed"] = embed.to(self.ctx.compute_dtype)
        images = batch.get("image")  # absent in training batches of per-bucket precomputed latents
        if self.mcfg.super_res.low_res:
            sr = self.mcfg.super_res
            batch_size = images.shape[0]
            level = (random_levels(batch_size, sr.max_train_noise_level, self.ctx.device) if train
                     else torch.full((batch_size,), sr.sample_noise_level, device=self.ctx.device))
            gens = None if generator is None else [generator] * batch_size  # drawn in turn, image by image
            inputs["low_res"] = low_res_input(self._low_res(images), self.sampler(None), level, gens,
                                              size=self._grid_shape(images)).to(images.dtype)
            inputs["level"] = level
        if self.mcfg.micro_conditioning.enabled:
            inputs["sizes"] = self._sizes(batch, images)
        return inputs

    def _sizes(self, batch: dict, images: torch.Tensor | None) -> torch.Tensor:
        """(B, 6) int64 original size, crop and target size of the batch images: the bucketed loader's record, or
        (evaluation batches, which carry none) "uncropped, original = target" as at sampling."""
        if "orig_size" not in batch:
            return default_sizes(images.shape[0], images.shape[-2], images.shape[-1], device=self.ctx.device)
        parts = [batch[k] for k in ("orig_size", "crop_top_left", "target_size")]
        return torch.cat(parts, dim=1).to(self.ctx.device, non_blocking=True)

    # ----------------------------------------------------------------------------------------- train
    def training_step(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], batch: dict,
                      part: str) -> StepOutput:
        unet = models[part]
        x0 = self._x0(frozen, batch)
        inputs = self._inputs(frozen, batch, train=True)
        inputs = guidance_dropout(inputs, self.mcfg, self.ctx.device)
        cond = self.conditioning(inputs["text"].shape[-1])
        out = diffusion_loss(lambda x_t, t: unet_forward(unet, cond, x_t, t, inputs, dynamic_size=self.dynamic_size),
                             x0, self.schedule, self.mcfg.diffusion, weights=self._loss_weights(batch, x0))
        return StepOutput(out.loss, {"mse": out.per_sample.detach().mean()})

    def _loss_weights(self, batch: dict, x0: torch.Tensor) -> torch.Tensor | None:
        """Per-pixel loss weights (B, 1, h, w) in [0, 1] on x0's grid from the batch's loss masks (model.loss_mask;
        area-averaged onto a latent grid), or None."""
        if not self.mcfg.loss_mask:
            return None
        mask = batch["loss_mask"].to(x0.device, non_blocking=True).to(torch.float32) / 255.0
        return mask if mask.shape[-2:] == x0.shape[-2:] else F.interpolate(mask, size=x0.shape[-2:], mode="area")

    # ---------------------------------------------------------------------------------------- sample
    def sampler(self, unet: nn.Module | None, settings: SamplingConfig | None = None,
                decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> CascadeLevel:
        """This stage's network as a :class:`CascadeLevel` around `unet` (None: only its schedule/grid are used);
        `decode` maps latents to images for a latent stage."""
        sr = self.mcfg.super_res
        return CascadeLevel(name=self.mcfg.name, unet=unet, cond=self.conditioning(self._text_dim()),
                            schedule=self.schedule, target=self.mcfg.diffusion.target, resolution=self.resolution,
                            grid=self.grid, defaults=settings or self.mcfg.sampling, low_res=sr.low_res,
                            sample_noise_level=sr.sample_noise_level, decode=decode,
                            drop_sizes=self.mcfg.micro_conditioning.drop_with_text, buckets=self.buckets)

    def _sample_for(self, unet: nn.Module, frozen: Mapping[str, nn.Module], batch: dict, guidance: float,
                    seed: int, image_indices: list[int] | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], the batch images' shape, for the batch's captions (and low-res images
        for super-resolution)."""
        # sizes left out too: grids and fidelity sample with the sampling default, as a user does
        inputs = {k: v for k, v in self._inputs(frozen, batch, train=False).items()
                  if k not in ("low_res", "level", "sizes")}
        if self.mcfg.super_res.low_res:
            inputs["images"] = self._low_res(batch["image"])
        settings = SamplingConfig(sampler=self.mcfg.sampling.sampler, guidance=guidance,
                                  guidance_rescale=self.mcfg.sampling.guidance_rescale,
                                  dynamic_threshold=self.mcfg.sampling.dynamic_threshold)
        decode = frozen["autoencoder"].decode if self.mcfg.space == "latent" else None
        return sample_level(self.sampler(unet, decode=decode), inputs, settings=settings, seed=seed,
                            image_indices=image_indices, shape=tuple(batch["image"].shape[-2:]))

    def sample_images(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], seed: int,
                      batch: dict | None = None) -> torch.Tensor | None:
        if batch is None or not self.mcfg.grid_images:
            return None
        batch = _head(batch, self.mcfg.grid_images)
        images = self._sample_for(models["unet"], frozen, batch, self.mcfg.sampling.guidance, seed)
        rows = [images]
        if self.mcfg.super_res.low_res:  # low-res input | output | real, side by side per image
            low = F.interpolate(self._low_res(batch["image"]), size=images.shape[-2:], mode="nearest")
            rows = [low, images, batch["image"].float()]
        grid = torch.stack(rows, dim=1).flatten(0, 1)
        return ((grid + 1.0) / 2.0).clamp(0, 1).cpu()

    # -------------------------------------------------------------------------------------- evaluate
    def evaluate(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                 batches: Iterable[dict]) -> EvalSums:
        unet = models["unet"]
        sums = MetricSums()
        prompts_left = self.mcfg.eval_prompts // max(1, self.ctx.world_size)
        images_left = self.cfg.eval.num_images // max(1, self.ctx.world_size)  # equal shares: ranks in lockstep
        quality = GenerationMetrics(*self._quality_models()) if images_left else None
        seconds = 0.0
        for index, batch in enumerate(batches):
            sums.merge(self._bucket_losses(unet, frozen, batch, index))
            if prompts_left > 0:
                head = _head(batch, prompts_left)
                prompts_left -= len(head["caption"])
                self._fidelity(unet, frozen, head, index, sums)
            if quality is not None and images_left > 0:
                start, head = time.perf_counter(), _head(batch, images_left)
                images_left -= len(head["caption"])
                self._generate_for_metrics(unet, frozen, head, quality)
                seconds += time.perf_counter() - start
        if quality is not None:
            sums.merge(self._quality_sums(quality, seconds))
        return sums.sums()

    # Generation metrics (eval.num_images): FID/KID (Inception) and CLIP score of images for held-out captions.
    def _quality_models(self) -> tuple:
        """(Inception extractor or None, CLIP or None), loaded on first use and kept (never cast like frozen
        helpers: fp32 on this rank's device)."""
        if self._quality is None:
            self._quality = quality_models(self.cfg.eval, self.ctx.device)
        return self._quality

    def _generate_for_metrics(self, unet: nn.Module, frozen: Mapping[str, nn.Module], batch: dict,
                              quality: GenerationMetrics) -> None:
        """Images for the batch's captions, each seeded by its sample (not its rank or batch position)."""
        ids = [sample_id(key) for key in batch["key"]]
        guidance = self.cfg.eval.guidance or self.mcfg.sampling.guidance
        images = self._sample_for(unet, frozen, batch, guidance, seed=self.cfg.train.seed, image_indices=ids)
        real = _unit(batch["image"]) if "image" in batch else None
        quality.add(ids, _unit(images), real, list(batch["caption"]))

    def _quality_sums(self, quality: GenerationMetrics, seconds: float) -> dict[str, tuple[float, float]]:
        """Every rank's rows gathered; rank 0 reports the figures (other ranks nothing, so means stay exact)."""
        share = quality.share()
        shares = [share]
        if self.ctx.world_size > 1:
            import torch.distributed as tdist

            shares = [None] * self.ctx.world_size
            tdist.all_gather_object(shares, share)
        if self.ctx.rank != 0:
            return {}
        ecfg = self.cfg.eval
        inception = self._quality_models()[0]
        reference = load_reference_stats(ecfg.fid_stats, inception.digest, self.resolution) if ecfg.fid_stats \
            else None
        figures = generation_figures(shares, reference, ecfg.kid_subsets, ecfg.kid_subset_size, self.cfg.train.seed)
        figures.update(guidance=ecfg.guidance or self.mcfg.sampling.guidance, generation_seconds=seconds)
        return {key: (value, 1.0) for key, value in figures.items()}

    def _fidelity(self, unet: nn.Module, frozen: Mapping[str, nn.Module], batch: dict, seed: int,
                  sums: MetricSums) -> None:
        """Prompt fidelity of images sampled with and without guidance for the batch's synthetic-grammar captions
        (pipeline/eval/fidelity.py). Captions are parsed first: only those samples are generated, and a batch of
        other captions (real data) costs nothing."""
        parsed = [(i, parse_caption(caption)) for i, caption in enumerate(batch["caption"])]
        parsed = [(i, objects) for i, objects in parsed if objects is not None]
        if not parsed:
            return
        chosen = _rows(batch, [i for i, _ in parsed])
        for suffix, guidance in (("", self.mcfg.sampling.guidance), ("_no_guidance", 1.0)):
            images = self._sample_for(unet, frozen, chosen, guidance, seed=seed)
            pixels = ((images.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
            found = fidelity_sums(pixels, [objects for _, objects in parsed])
            sums.merge({f"fidelity_{k}{suffix}": v for k, v in found.items()})

    def _bucket_losses(self, unet: nn.Module, frozen: Mapping[str, nn.Module], batch: dict,
                       index: int) -> dict[str, tuple[float, float]]:
        """Unweighted denoising MSE per timestep bucket, with every random draw (stratified timesteps, noise, and
        the noise-augmentation noise of a super-resolution stage's low-res input) fixed by the batch index, so
        successive evaluations compare like with like."""
        gen = torch.Generator(device=self.ctx.device).manual_seed(index)
        inputs = self._inputs(frozen, batch, train=False, generator=gen)
        cond = self.conditioning(inputs["text"].shape[-1])
        x0 = self._x0(frozen, batch)
        t = stratified_timesteps(x0.shape[0], self.schedule.num_timesteps, x0.device, generator=gen)
        out = diffusion_loss(lambda x_t, t: unet_forward(unet, cond, x_t, t, inputs), x0, self.schedule,
                             self.mcfg.diffusion, generator=gen, t=t)
        width = self.schedule.num_timesteps / BUCKETS
        result = {"loss": (float(out.per_sample.sum()), float(out.per_sample.numel()))}
        bucket = (out.t.float() / width).long().clamp(max=BUCKETS - 1)
        for b in range(BUCKETS):
            chosen = out.per_sample[bucket == b]
            lo, hi = int(b * width), int((b + 1) * width) - 1
            result[f"loss_t{lo:04d}-{hi:04d}"] = (float(chosen.sum()), float(chosen.numel()))
        return result

    # ---------------------------------------------------------------------------------------- export
    def component_name(self) -> str:
        return f"unet_{self.mcfg.name}"

    def export_helpers(self, bundle: Path, dtype: torch.dtype, reference: bool) -> dict[str, dict]:
        """The T5 the cascade encodes prompts with, as bundle component `t5` (one T5 per bundle: every U-Net
        stage of a cascade reads the same tokens)."""
        source = self.mcfg.text_encoder.path
        existing = read_index(bundle)["components"].get("t5") if (bundle / "bundle.json").is_file() else None
        if existing is not None:
            if existing.get("source") != source:
                raise PipelineError(f"{bundle} already holds T5 {existing.get('source')!r}; this stage was trained "
                                    f"with {source!r}: a cascade's stages must share one T5 (use another bundle)")
            return {}
        if reference:
            if not _is_local(source) or Path(source).exists():
                return {"t5": {"kind": "t5", "source": source, "reference": str(Path(source).resolve())
                               if Path(source).exists() else source}}
        save_t5(self.mcfg.text_encoder, bundle / "t5", dtype)
        return {"t5": {"kind": "t5", "source": source}}

    def export(self, modules: Mapping[str, nn.Module], out_dir: Path) -> dict:
        """A diffusers folder: the U-Net's save_pretrained (config.json + safetensors), its scheduler config, and
        t2i_stage.json with what a sampler needs to condition it (our convention, pipeline/models/unet.py)."""
        unet = modules["unet"]
        unet.save_pretrained(str(out_dir), safe_serialization=True)
        mcfg = self.mcfg
        threshold = mcfg.sampling.dynamic_threshold if mcfg.space == "pixel" else None  # as _threshold samples
        scheduler = scheduler_config(self.schedule, mcfg.sampling.sampler, target=mcfg.diffusion.target,
                                     threshold=threshold)
        (out_dir / "scheduler").mkdir(parents=True, exist_ok=True)
        (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        stage = {"name": mcfg.name, "space": mcfg.space, "resolution": self.resolution, "grid": list(self.grid),
                 "buckets": [list(s) for s in self.sampler(None).shapes],
                 "conditioning": self.conditioning(self._text_dim()).__dict__, "model": to_dict(mcfg)}
        if mcfg.space == "latent":  # which autoencoder the latents belong to: the bundle's must be this one
            stage["autoencoder_sha256"] = autoencoder_digest(mcfg.autoencoder)
        (out_dir / STAGE_META).write_text(json.dumps(stage, indent=2) + "\n", encoding="utf-8")
        sr = mcfg.super_res
        return {"resolution": self.resolution, "space": mcfg.space, "low_res": sr.low_res,
                "sample_noise_level": sr.sample_noise_level, "image_embed_dim": mcfg.image_embed.dim,
                "sampling": to_dict(mcfg.sampling), "t5": to_dict(mcfg.text_encoder)}


def autoencoder_digest(path: str) -> str:
    """sha256 of the autoencoder's weights as it is exported (a folder: its safetensors file; a run dir: the
    weights it would export), so a bundle can check its autoencoder is the one a latent stage was trained on."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return ""  # a run dir: the bundle check then relies on the autoencoder exported from that run
    files = describe_files(folder)
    return next((entry["sha256"] for name, entry in sorted(files.items()) if name.endswith(".safetensors")), "")


def _unit(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> [0, 1] float on the CPU."""
    return ((images.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def _head(batch: dict, n: int) -> dict:
    """The first `n` samples of a batch (tensors and lists)."""
    return {k: v[:n] for k, v in batch.items()}


def _rows(batch: dict, indices: list[int]) -> dict:
    """The samples `indices` of a batch (tensors and lists), in that order."""
    index = torch.tensor(indices, dtype=torch.long)
    return {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) else [v[i] for i in indices]
            for k, v in batch.items()}
