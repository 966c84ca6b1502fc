"""The `prior` stage: a DALL-E 2 diffusion prior (diffusers ``PriorTransformer``) from CLIP text to CLIP image
embeddings, against a frozen CLIP exported by the `clip` stage (conventions: pipeline/models/prior.py).

Training: the frozen CLIP gives the per-token text encodings, the padding mask, the text embedding and the target
image embedding (its image tower on the batch, or ``clip_image_emb`` from precomputed shards); the target is
normalised with the prior's clip_mean/clip_std and denoised with our objective (x0 by default), with
classifier-free dropout of the text. Evaluation: embeddings sampled for held-out captions against the true image
embeddings (pipeline/eval/prior.py) and the held-out denoising loss. Export: a diffusers folder.

clip_mean / clip_std. They are statistics of the CLIP image embeddings of the training data, frozen parameters of
the diffusers class. ``build_frozen`` - which the Trainer calls after ``build_trainable`` (and after
``ckpt.init_from``) and before it creates the engines, and which export never calls - loads the CLIP and, when the
prior's clip_std is still zero (freshly built), sets them from the first ``model.stats_samples`` training samples:
read in shard order with center crops, the same samples on every rank, so every rank computes the same numbers
without a collective, before DeepSpeed copies or partitions anything. They are part of the state dict, so
checkpoints restore them on resume (recomputing first is harmless: the same data gives the same numbers) and
export writes them; weights from ``ckpt.init_from`` keep theirs. Computing them from the first training batches
would differ per rank and arrive after the engines exist; running averages would move the target while training.
Being frozen, they are left out of the optimizer and the EMA. ZeRO-1 is refused: DeepSpeed stores frozen parameters
of a ZeRO-1 checkpoint only in the module state, which zero_to_fp32 (export, ckpt.init_from) does not read.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pipeline.bundle import PRIOR_META
from pipeline.config import Config
from pipeline.config_schema import check, doc, to_dict
from pipeline.data.loader import build_eval_loader
from pipeline.data.spec import SampleSpec, normalize_batch
from pipeline.diffusion.objective import cfg_drop, diffusion_loss
from pipeline.diffusion.samplers import make_scheduler, scheduler_config
from pipeline.diffusion.schedules import DiffusionConfig, NoiseSchedule, build_schedule
from pipeline.errors import ConfigError, PipelineError
from pipeline.eval.prior import prior_eval_sums
from pipeline.models.attention import ATTENTION_BACKENDS
from pipeline.models.diffusers_attention import install_attention
from pipeline.models.frozen_clip import ClipInfo, FolderTokenize, FrozenClip, TextEncoding, read_clip_info
from pipeline.models.prior import (PriorConfig, build_prior, condition, normalize_embedding, null_condition,
                                   prior_forward, set_stats)
from pipeline.sampling.prior import PriorSampler, PriorSamplingConfig
from pipeline.train.stage import EvalSums, MetricSums, Stage, StageContext, StepOutput

IMAGE_EMB = "clip_image_emb"  # the array `shards precompute --encoder clip-image:CLIP_DIR` writes
MIN_STD = 1e-6  # a dimension with (numerically) no spread would divide the target by ~0


@dataclass(frozen=True)
class PriorStageConfig:
    """The `model:` section of a `stage: prior` config."""

    clip: str = doc("", "The frozen CLIP: an open_clip folder (open_clip_config.json + weights), e.g. the 'clip' "
                        "component of an exported clip run. Its embedding width and context length size the prior.")
    prior: PriorConfig = doc(PriorConfig(), "Prior transformer architecture.")
    text_tokens: Literal["projected", "raw"] = doc(
        "projected", "Per-token text encodings given to the prior: 'projected' through the CLIP text projection "
                     "(width E, any CLIP) or 'raw' (the text tower's width W; only when W equals E).")
    image_source: Literal["encoder", "precomputed"] = doc(
        "encoder", "Target image embeddings: 'encoder' runs the CLIP image tower on each batch; 'precomputed' reads "
                   "clip_image_emb from data.precomputed_urls (shards precompute --encoder clip-image:CLIP_DIR).")
    attention: Literal["sdpa", "triton", "xformers"] = doc("sdpa", "Attention kernel of every prior attention.")
    diffusion: DiffusionConfig = doc(DiffusionConfig(target="x0", loss_weighting="uniform"),
                                     "Noise schedule, target (DALL-E 2: x0) and loss weighting.")
    cond_drop_prob: float = doc(0.1, "Probability that a sample's text (tokens and embedding) is replaced by the null "
                                     "condition (classifier-free guidance training).")
    sampling: PriorSamplingConfig = doc(PriorSamplingConfig(), "Default sampling (evaluation and export).")
    stats_samples: int = doc(1024, "Training samples (the first ones, in shard order) whose image embeddings set "
                                   "the prior's clip_mean/clip_std.")

    def __post_init__(self) -> None:
        check(bool(self.clip), "model.clip", "is required: the exported CLIP folder the prior is trained against")
        check(self.attention in ATTENTION_BACKENDS, "model.attention", f"must be one of {ATTENTION_BACKENDS}")
        check(self.diffusion.schedule != "shifted_cosine", "model.diffusion.schedule",
              "'shifted_cosine' shifts by image resolution, which an embedding does not have; use 'cosine'")
        check(self.diffusion.objective == "vp", "model.diffusion.objective",
              "must be vp for the prior: flow matching is offered (and tested) for unet stages")
        check(0.0 <= self.cond_drop_prob < 1.0, "model.cond_drop_prob", f"must be in [0, 1), got {self.cond_drop_prob}")
        check(self.stats_samples >= 2, "model.stats_samples", f"must be >= 2, got {self.stats_samples}")


class PriorStage(Stage):
    """Trains one part, "prior"; one frozen helper, "clip" (:class:`FrozenClip`)."""

    name = "prior"
    model_config_cls = PriorStageConfig

    def __init__(self, cfg: Config, ctx: StageContext) -> None:
        super().__init__(cfg, ctx)
        self.mcfg: PriorStageConfig = cfg.model
        if cfg.train.activation_checkpointing:
            raise ConfigError("train.activation_checkpointing: diffusers' PriorTransformer does not support gradient "
                              "checkpointing; set it to false")
        self.schedule: NoiseSchedule = build_schedule(self.mcfg.diffusion, self.mcfg.diffusion.shift_base_resolution)
        make_scheduler(self.schedule, self.mcfg.sampling.sampler)  # sampler settings that cannot work fail now
        self._info: ClipInfo | None = None
        self._built: nn.Module | None = None  # the prior of build_trainable, whose statistics build_frozen sets
        self._stats: weakref.WeakKeyDictionary[nn.Module, tuple[torch.Tensor, torch.Tensor]] = \
            weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------------------------------ build
    @property
    def info(self) -> ClipInfo:
        """Sizes of the CLIP folder (read from its config once; a missing folder is a one-line ConfigError)."""
        if self._info is None:
            info = read_clip_info(self.mcfg.clip)
            if self.mcfg.text_tokens == "raw" and info.token_width != info.embed_dim:
                raise ConfigError(f"model.text_tokens: 'raw' needs the CLIP text width ({info.token_width}) to equal "
                                  f"its embedding width ({info.embed_dim}) (diffusers' PriorTransformer projects "
                                  "tokens of width embedding_dim); use 'projected'")
            self._info = info
        return self._info

    def sample_spec(self) -> SampleSpec:
        info = self.info
        tokenize = FolderTokenize(self.mcfg.clip)
        if self.mcfg.image_source == "precomputed":
            return SampleSpec(image_size=0, tokenize=tokenize, precomputed=(IMAGE_EMB,))
        if self.cfg.data.resolution != info.image_size:
            raise ConfigError(f"data.resolution ({self.cfg.data.resolution}) must equal the image size of the CLIP "
                              f"in model.clip ({info.image_size})")
        return SampleSpec(image_size=info.image_size, image_mean=info.mean, image_std=info.std, tokenize=tokenize)

    def input_paths(self) -> dict[str, str]:
        return {"model.clip": self.mcfg.clip}

    def build_trainable(self) -> dict[str, nn.Module]:
        prior = build_prior(self.mcfg.prior, embed_dim=self.info.embed_dim, num_tokens=self.info.context_length)
        install_attention(prior, self.mcfg.attention)
        self._built = prior
        return {"prior": prior}

    def build_frozen(self) -> dict[str, nn.Module]:
        clip = FrozenClip.load(self.mcfg.clip)
        if self._built is not None and not bool(self._built.clip_std.detach().abs().sum() > 0):
            mean, std = self.embedding_stats(clip.to(self.ctx.device))
            set_stats(self._built, mean, std)
        return {"clip": clip}

    @torch.no_grad()
    def embedding_stats(self, clip: FrozenClip) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std (E,) float32 of the first `stats_samples` training image embeddings."""
        spec = self.sample_spec()
        data = replace(self.cfg.data, eval_urls=self.cfg.data.urls,
                       eval_precomputed_urls=self.cfg.data.precomputed_urls, num_workers=0)
        loader = build_eval_loader(data, replace(spec, tokenize=None), batch_size=self.cfg.eval.batch_size,
                                   max_samples=self.mcfg.stats_samples, rank=0, world_size=1)
        embeddings = [self._image_embedding(clip, normalize_batch(b, spec, self.ctx.device, torch.float32))
                      for b in loader]
        found = torch.cat(embeddings).double() if embeddings else torch.zeros(0)
        if found.shape[0] < 2:
            raise PipelineError(f"model.stats_samples: found {found.shape[0]} readable training samples in data.urls; "
                                "the prior's clip_mean/clip_std need at least 2")
        return found.mean(dim=0).float(), found.std(dim=0).clamp(min=MIN_STD).float()

    # ----------------------------------------------------------------------------------------- inputs
    def _image_embedding(self, clip: FrozenClip, batch: dict) -> torch.Tensor:
        """(B, E) float32 L2-normalised target image embeddings of a (normalised) batch."""
        if self.mcfg.image_source == "precomputed":
            return batch[IMAGE_EMB].to(self.ctx.device, non_blocking=True).float()
        return clip.encode_image(batch["image"]).float()

    def _encode(self, frozen: Mapping[str, nn.Module], batch: dict) -> tuple[TextEncoding, torch.Tensor]:
        clip = frozen["clip"]
        text = clip.encode_text(batch["text"].to(self.ctx.device, non_blocking=True))
        return text, self._image_embedding(clip, batch)

    def _condition(self, frozen: Mapping[str, nn.Module], text: TextEncoding) -> dict[str, torch.Tensor]:
        cond = condition(frozen["clip"], text, self.mcfg.text_tokens)
        return {k: (v.to(self.ctx.compute_dtype) if v.is_floating_point() else v) for k, v in cond.items()}

    def stats(self, prior: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's clip_mean, clip_std (1, E) float32, read once per module.

        Under ZeRO-3 the parameters are partitioned outside forward, so they are gathered (a collective: every rank
        reaches this at the same point, in its first training step). They are frozen, so the copy stays valid.
        """
        module = getattr(prior, "module", prior)  # a DeepSpeed engine in training_step, the module elsewhere
        if module not in self._stats:
            mean, std = module.clip_mean, module.clip_std
            if hasattr(mean, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([mean, std]):
                    found = (mean.detach().float().clone(), std.detach().float().clone())
            else:
                found = (mean.detach().float().clone(), std.detach().float().clone())
            if not bool((found[1] > 0).all()):
                raise PipelineError("the prior's clip_std has zero entries: its embedding statistics were never set "
                                    "(build_frozen sets them before training)")
            self._stats[module] = found
        return self._stats[module]

    # ----------------------------------------------------------------------------------------- train
    def training_step(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module], batch: dict,
                      part: str) -> StepOutput:
        prior = models[part]
        text, image_emb = self._encode(frozen, batch)
        mean, std = self.stats(prior)
        x0 = normalize_embedding(image_emb, mean, std).to(self.ctx.compute_dtype)
        drop = cfg_drop(x0.shape[0], self.mcfg.cond_drop_prob, self.ctx.device)
        cond = null_condition(self._condition(frozen, text), drop)
        out = diffusion_loss(lambda x_t, t: prior_forward(prior, x_t, t, cond), x0, self.schedule, self.mcfg.diffusion)
        return StepOutput(out.loss, {"mse": out.per_sample.detach().mean()})

    # -------------------------------------------------------------------------------------- evaluate
    def sampler(self, prior: nn.Module, clip: FrozenClip, settings: PriorSamplingConfig | None = None) -> PriorSampler:
        """This stage's prior as a :class:`PriorSampler` (statistics read as in :meth:`stats`)."""
        return PriorSampler(prior, clip, self.schedule, self.mcfg.diffusion.target, settings or self.mcfg.sampling,
                            self.mcfg.text_tokens, stats=self.stats(prior))

    def evaluate(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                 batches: Iterable[dict]) -> EvalSums:
        prior = models["prior"]
        sampler = self.sampler(prior, frozen["clip"])
        mean, std = self.stats(prior)
        sums = MetricSums()
        for index, batch in enumerate(batches):
            text, image_emb = self._encode(frozen, batch)
            found = prior_eval_sums(sampler.sample(text, seed=index), text.pooled, image_emb, list(batch["caption"]))
            # the held-out denoising loss, with noise and timesteps fixed by the batch index (comparable over time)
            gen = torch.Generator(device=self.ctx.device).manual_seed(index)
            x0 = normalize_embedding(image_emb, mean, std).to(self.ctx.compute_dtype)
            cond = self._condition(frozen, text)
            out = diffusion_loss(lambda x_t, t: prior_forward(prior, x_t, t, cond), x0, self.schedule,
                                 self.mcfg.diffusion, generator=gen)
            found["loss"] = (float(out.per_sample.sum()), float(out.per_sample.numel()))
            sums.merge(found)
        return sums.sums()

    # ---------------------------------------------------------------------------------------- export
    def export(self, modules: Mapping[str, nn.Module], out_dir: Path) -> None:
        """A diffusers folder: PriorTransformer.save_pretrained (config.json + safetensors, clip_mean/clip_std
        included), scheduler/scheduler_config.json, and t2i_prior.json with what sampling needs."""
        prior = modules["prior"]
        if not bool((prior.clip_std.detach() > 0).all()):
            raise PipelineError("the prior's clip_std has zero entries: its embedding statistics were never set")
        prior.save_pretrained(str(out_dir), safe_serialization=True)
        mcfg = self.mcfg
        scheduler = scheduler_config(self.schedule, mcfg.sampling.sampler, target=mcfg.diffusion.target)
        (out_dir / "scheduler").mkdir(parents=True, exist_ok=True)
        (out_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        info = self.info
        meta = {"format": 1, "target": mcfg.diffusion.target, "text_tokens": mcfg.text_tokens,
                "attention": "sdpa",  # the portable default for whoever loads it; any backend computes the same
                "clip": {"path": str(Path(info.path).resolve()), "embed_dim": info.embed_dim,
                         "context_length": info.context_length, "token_width": info.token_width,
                         "weights_sha256": _weights_digest(Path(info.path))},
                "diffusion": to_dict(mcfg.diffusion), "sampling": to_dict(mcfg.sampling),
                "stats_samples": mcfg.stats_samples, "model": to_dict(mcfg)}
        (out_dir / PRIOR_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _weights_digest(folder: Path) -> str:
    """sha256 of the CLIP folder's weights (which CLIP the prior's embeddings belong to); '' when none is found."""
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        for path in sorted(folder.glob(pattern)):
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest()
    return ""
