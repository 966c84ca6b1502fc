"""The `clip` stage: contrastive training of an open_clip model, retrieval evaluation, open_clip export."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.config import Config
from pipeline.data.spec import SampleSpec
from pipeline.errors import ConfigError
from pipeline.eval.retrieval import retrieval_sums
from pipeline.losses.contrastive import clip_loss, siglip_loss
from pipeline.models.clip import (ClipConfig, ClipTokenize, build_clip, image_size_of, is_pretrained_tag,
                                  open_clip_model_cfg, preprocess_cfg)
from pipeline.train.stage import EvalSums, MetricSums, Stage, StageContext, StepOutput

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


class ClipStage(Stage):
    """Trains one part, "model": an open_clip CLIP whose forward(image, text) returns normalised features."""

    name = "clip"
    model_config_cls = ClipConfig

    def __init__(self, cfg: Config, ctx: StageContext) -> None:
        super().__init__(cfg, ctx)
        self.mcfg: ClipConfig = cfg.model
        self.model_cfg = open_clip_model_cfg(self.mcfg)
        size = image_size_of(self.model_cfg)
        if cfg.data.resolution != size:
            raise ConfigError(f"data.resolution ({cfg.data.resolution}) must equal the CLIP image size ({size}) "
                              f"of model.arch {self.mcfg.arch!r}")

    def sample_spec(self) -> SampleSpec:
        pre = preprocess_cfg(self.model_cfg)
        return SampleSpec(image_size=pre["size"], image_mean=tuple(pre["mean"]), image_std=tuple(pre["std"]),
                          tokenize=ClipTokenize(self.mcfg))

    def input_paths(self) -> dict[str, str]:
        pretrained = self.mcfg.pretrained
        if not pretrained or is_pretrained_tag(self.mcfg):
            return {}
        return {"model.pretrained": pretrained}

    def build_trainable(self) -> dict[str, nn.Module]:
        model = build_clip(self.mcfg)
        if self.cfg.train.activation_checkpointing:
            model.set_grad_checkpointing(True)
        return {"model": model}

    def _features(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
        # The Trainer already normalised the image onto the device in the compute dtype (base.py contract).
        text = batch["text"].to(self.ctx.device, non_blocking=True)
        return model(batch["image"], text)  # (image_features, text_features, logit_scale.exp()[, logit_bias])

    def training_step(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                      batch: dict, part: str) -> StepOutput:
        out = self._features(models["model"], batch)
        # Loss math in fp32 whatever the compute dtype: logits of up to 100 x cosine need the precision.
        image_f, text_f = out[0].float(), out[1].float()
        # Clamping the used value (not the parameter) keeps the model pure and works on ZeRO-3 shards.
        scale = out[2].float().clamp(max=self.mcfg.max_logit_scale)
        dist_args = {"rank": self.ctx.rank, "world_size": self.ctx.world_size,
                     "gather_with_grad": self.mcfg.gather_with_grad}
        if self.mcfg.loss == "siglip":
            loss = siglip_loss(image_f, text_f, scale, out[3].float(), **dist_args)
        else:
            loss = clip_loss(image_f, text_f, scale, local_loss=self.mcfg.local_loss, **dist_args)
        metrics = {"logit_scale": scale.detach()}
        if self.mcfg.loss == "siglip":
            metrics["logit_bias"] = out[3].detach().float()
        return StepOutput(loss, metrics)

    @torch.no_grad()
    def evaluate(self, models: Mapping[str, nn.Module], frozen: Mapping[str, nn.Module],
                 batches: Iterable[dict]) -> EvalSums:
        totals = MetricSums()
        for batch in batches:
            out = self._features(models["model"], batch)
            totals.merge(retrieval_sums(out[0], out[1], batch["caption"]))
        return totals.sums()

    def export(self, modules: Mapping[str, nn.Module], out_dir: Path) -> None:
        """Write an open_clip ``local-dir:`` folder: open_clip_config.json + open_clip_model.safetensors."""
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in modules["model"].state_dict().items()}
        save_file(state, str(out_dir / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": preprocess_cfg(self.model_cfg),
                  "t2i_pipeline": {"stage": self.name, "arch": self.mcfg.arch, "loss": self.mcfg.loss}}
        (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
