"""Typed, frozen run configuration with strict YAML loading and ``--set a.b=c`` overrides.

A run config is one YAML file::

    stage: clip            # which Stage class trains (see pipeline.registry)
    model: {...}           # parsed by that stage's own model-config dataclass
    data:  {...}           # DataConfig
    optim: {...}           # OptimConfig
    train: {...}           # TrainConfig
    eval:  {...}           # EvalConfig
    dist:  {...}           # DistConfig
    ckpt:  {...}           # CkptConfig
    log:   {...}           # LogConfig

Every field carries its meaning and unit in ``metadata["doc"]`` (see :func:`doc`). Unknown keys, wrong types
and invalid values raise :class:`~pipeline.errors.ConfigError` naming the file, the full key path and, for a
misspelling, the closest valid key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config_schema import check, doc, from_dict, parse_override_value, resolve_field_type, to_dict
from pipeline.errors import ConfigError
from pipeline.registry import STAGES, model_config_class

ShardSpec = str | tuple[str, ...]


@dataclass(frozen=True)
class BucketConfig:
    """Aspect-ratio buckets: images keep their shape instead of being cropped to squares (off by default)."""

    enabled: bool = doc(False, "Batch images in buckets of about equal area and different shapes; each micro-batch "
                               "holds one bucket, a sample waits in its bucket until the bucket fills (each data "
                               "worker holds up to buckets x (micro-batch - 1) decoded images).")
    shapes: tuple[tuple[int, int], ...] = doc((), "Explicit bucket shapes as [height, width] pixel pairs; empty = "
                                                  "generate them from the stage's resolution, min/max side and step.")
    min_side: int = doc(0, "Pixels; the shortest side a generated bucket may have; 0 = half the resolution.")
    max_side: int = doc(0, "Pixels; the longest side a generated bucket may have; 0 = twice the resolution.")
    step: int = doc(8, "Pixels; every generated side is a multiple of this. Choose one that every stage's "
                       "down-sampling divides (e.g. 8 for a pixel U-Net with 3 down-samplings, 64 for a latent "
                       "f8 U-Net with 3); the resolution must be a multiple of it.")

    def __post_init__(self) -> None:
        check(self.step > 0, "data.buckets.step", f"must be a positive pixel count, got {self.step}")
        check(self.min_side >= 0 and self.max_side >= 0, "data.buckets.min_side/max_side",
              f"must be >= 0 pixels, got {self.min_side}/{self.max_side}")
        check(not self.min_side or not self.max_side or self.min_side <= self.max_side, "data.buckets.min_side",
              f"must be <= max_side, got {self.min_side} > {self.max_side}")
        check(all(h > 0 and w > 0 for h, w in self.shapes), "data.buckets.shapes",
              f"must be positive [height, width] pairs, got {list(self.shapes)}")


@dataclass(frozen=True)
class DataConfig:
    """Where samples come from and how they are turned into tensors."""

    urls: ShardSpec = doc("", "Training shards: a directory (every *.tar in it), a brace pattern such as "
                          "'dir/shard-{000000..000009}.tar', a list of these, or 'pipe:CMD' whose stdout is a tar.")
    eval_urls: ShardSpec = doc("", "Held-out shards for evaluation, same forms as `urls`; empty disables evaluation.")
    precomputed_urls: ShardSpec = doc("", "Precomputed-conditioning shards aligned with `urls` (the --out directory of "
                                      "`python -m pipeline shards precompute`; several directories for several "
                                      "runs), same forms as `urls` but local files only. Read only when the stage "
                                      "asks for precomputed arrays; empty = none.")
    eval_precomputed_urls: ShardSpec = doc("", "Precomputed-conditioning shards aligned with `eval_urls`, same rules "
                                           "as `precomputed_urls`.")
    resolution: int = doc(64, "Side length in pixels that images are resized and cropped to.")
    crop: Literal["random", "center"] = doc("random", "Crop after the short side is resized to `resolution` (with "
                                                      "buckets: the offset along the long side of the bucket).")
    buckets: BucketConfig = doc(BucketConfig(), "Aspect-ratio buckets for training batches (evaluation stays "
                                                "square, centre-cropped).")
    caption_key: str = doc("txt", "Caption source: 'txt' reads KEY.txt; 'json:FIELD' reads FIELD of KEY.json.")
    num_workers: int = doc(2, "DataLoader worker processes per rank; 0 loads in the training process.")
    shuffle_buffer: int = doc(256, "Samples held in the shuffle buffer; 0 or 1 disables sample shuffling.")
    shuffle_shards: bool = doc(True, "Shuffle the shard order each epoch (seeded by train.seed and the epoch).")
    resampled: bool = doc(False, "Draw shards with replacement forever instead of in epochs.")
    min_image_size: int = doc(-1, "Pixels; images whose short side is smaller are skipped (counted as "
                                  "image_too_small). -1 = auto: 32, or the output size if smaller; with buckets the "
                                  "smallest bucket's short side; 0 keeps all.")
    max_aspect_ratio: float = doc(0.0, "Long/short side ratio above which images are skipped (counted as "
                                        "bad_aspect_ratio); 0 = off, with buckets: 1.2 x the widest bucket's ratio.")
    max_skip_fraction: float = doc(0.1, "Fraction (0-1) of skipped samples above which the run stops with an error.")
    skip_check_min_samples: int = doc(200, "Samples a loader must have seen (per worker stream and in total) before "
                                           "`max_skip_fraction` is enforced; a few early failures prove nothing.")
    worker_timeout_s: float = doc(600.0, "Seconds the training process waits for a data worker's next batch before "
                                         "failing with an error instead of hanging; 0 waits forever.")

    def __post_init__(self) -> None:
        check(self.resolution > 0, "data.resolution", f"must be a positive pixel count, got {self.resolution}")
        check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        check(0.0 <= self.max_skip_fraction <= 1.0, "data.max_skip_fraction",
              f"must be between 0 and 1, got {self.max_skip_fraction}")
        check(self.min_image_size >= -1, "data.min_image_size",
              f"must be >= 0 pixels or -1 (auto), got {self.min_image_size}")
        check(self.max_aspect_ratio == 0 or self.max_aspect_ratio >= 1, "data.max_aspect_ratio",
              f"must be 0 (off) or >= 1, got {self.max_aspect_ratio}")
        check(self.skip_check_min_samples >= 0, "data.skip_check_min_samples",
              f"must be >= 0, got {self.skip_check_min_samples}")
        check(self.worker_timeout_s >= 0, "data.worker_timeout_s", f"must be >= 0 seconds, got {self.worker_timeout_s}")
        check(self.caption_key == "txt" or (self.caption_key.startswith("json:") and len(self.caption_key) > 5),
              "data.caption_key", f"must be 'txt' or 'json:FIELD', got {self.caption_key!r}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (shared by every optimizer a stage declares)."""

    name: Literal["adamw"] = doc("adamw", "Optimizer; AdamW with decoupled weight decay.")
    lr: float = doc(1e-4, "Peak learning rate (per optimizer step, after warmup).")
    betas: tuple[float, float] = doc((0.9, 0.999), "Adam beta1, beta2.")
    eps: float = doc(1e-8, "Adam epsilon.")
    weight_decay: float = doc(0.0, "Decoupled weight decay coefficient.")
    warmup_steps: int = doc(0, "Optimizer steps of linear warmup from 0 to `lr`.")
    schedule: Literal["constant", "cosine", "linear"] = doc("cosine", "Decay after warmup, down to lr*min_lr_ratio.")
    min_lr_ratio: float = doc(0.0, "Final learning rate as a fraction of `lr` (cosine/linear schedules).")
    grad_clip: float = doc(1.0, "Clip the global gradient L2 norm to this value; 0 disables clipping.")
    fused: Literal["auto", "on", "off"] = doc("auto", "torch's fused AdamW kernel (one launch for all parameters): "
                                                      "'auto' = on with CUDA; never with dist.offload_optimizer.")

    def __post_init__(self) -> None:
        check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, batch, precision, EMA, fault handling."""

    max_steps: int = doc(1000, "Optimizer steps to train for (the run stops there).")
    micro_batch_size: int = doc(8, "Samples per rank per forward/backward pass.")
    grad_accum_steps: int = doc(1, "Micro-batches accumulated per optimizer step.")
    seed: int = doc(0, "Seed for model init, data order and every rank's RNGs.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto", "Compute dtype; 'auto' is bf16 on GPU and fp32 on CPU.")
    activation_checkpointing: bool = doc(False, "Recompute activations in backward to save memory.")
    compile: Literal["auto", "on", "off"] = doc(
        "auto", "torch.compile each trainable network in place (state dict and checkpoints unchanged): 'auto' = on "
                "with CUDA, off on CPU (compiling takes minutes there). Left eager under ZeRO-3, whose partition "
                "hooks break graph capture (logged).")
    compile_backend: str = doc("inductor", "torch.compile backend: 'inductor' (generated kernels); 'aot_eager' "
                                           "captures graphs without generating code (a quick check on CPU).")
    compile_shapes: Literal["auto", "dynamic", "static"] = doc(
        "auto", "How train.compile treats input shapes. 'dynamic': the image height and width are symbolic from "
                "the first compile, so one graph serves every bucket shape. 'static': a graph specialised per shape "
                "(one compile per bucket shape; the recompile limit is raised to 2 x buckets + 4 so no bucket falls "
                "back to eager). 'auto': dynamic with data.buckets, else torch's default (static, made dynamic after "
                "the first shape change).")
    ema_decay: float = doc(0.0, "Exponential moving average decay of trainable weights per step; 0 disables EMA.")
    log_every: int = doc(10, "Optimizer steps between metric records (metrics.jsonl, TensorBoard, progress bar).")
    sample_every: int = doc(0, "Optimizer steps between sample grids for generative stages; 0 disables.")
    max_nonfinite_streak: int = doc(3, "Consecutive non-finite steps (skipped) before rolling back to the last "
                                       "checkpoint; 0 never rolls back.")

    def __post_init__(self) -> None:
        check(self.max_steps > 0, "train.max_steps", f"must be > 0, got {self.max_steps}")
        check(self.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0, got {self.micro_batch_size}")
        check(self.grad_accum_steps > 0, "train.grad_accum_steps", f"must be > 0, got {self.grad_accum_steps}")
        check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        check(self.log_every > 0, "train.log_every", f"must be > 0, got {self.log_every}")
        check(self.sample_every >= 0, "train.sample_every", f"must be >= 0, got {self.sample_every}")
        check(self.max_nonfinite_streak >= 0, "train.max_nonfinite_streak",
              f"must be >= 0, got {self.max_nonfinite_streak}")


@dataclass(frozen=True)
class EvalConfig:
    """Periodic evaluation on `data.eval_urls`."""

    every_steps: int = doc(0, "Optimizer steps between evaluations (and one at the end); 0 disables.")
    max_samples: int = doc(1024, "Held-out samples used per evaluation (per run, not per rank).")
    batch_size: int = doc(64, "Samples per evaluation batch (the retrieval pool size for CLIP recall@k).")
    num_images: int = doc(0, "Generative stages: images generated per evaluation for eval/fid, eval/kid and "
                             "eval/clip_score, one per held-out caption (the first of data.eval_urls, fixed seeds), "
                             "split over the ranks; rounded down to a multiple of the rank count; 0 = off.")
    guidance: float = doc(0.0, "Guidance scale of those images (0 = the stage's model.sampling.guidance).")
    inception_weights: str = doc("", "torch-fidelity's TF-Inception weights file "
                                     "(weights-inception-2015-12-05-6726825d.pth) for eval/fid and eval/kid; '' = no "
                                     "FID/KID.")
    fid_stats: str = doc("", "Reference statistics from `python -m pipeline eval-stats` that eval/fid compares with; "
                             "'' = the Inception features of the same held-out images as the captions.")
    clip: str = doc("", "An open_clip folder (open_clip_config.json + weights, e.g. BUNDLE/clip) for "
                        "eval/clip_score; '' = no CLIP score.")
    kid_subsets: int = doc(100, "Random subsets the KID is averaged over.")
    kid_subset_size: int = doc(1000, "Samples per KID subset (capped at the number of images).")

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "eval.every_steps", f"must be >= 0, got {self.every_steps}")
        check(self.max_samples > 0, "eval.max_samples", f"must be > 0, got {self.max_samples}")
        check(self.batch_size > 0, "eval.batch_size", f"must be > 0, got {self.batch_size}")
        check(self.num_images >= 0 and self.guidance >= 0, "eval.num_images", "num_images and guidance must be >= 0")
        check(self.num_images <= self.max_samples, "eval.num_images",
              f"({self.num_images}) must be <= eval.max_samples ({self.max_samples}): one held-out caption each")
        check(self.num_images == 0 or bool(self.inception_weights or self.clip), "eval.num_images",
              "is set but neither eval.inception_weights (FID/KID) nor eval.clip (CLIP score) is: nothing to measure")
        check(not self.fid_stats or bool(self.inception_weights), "eval.fid_stats",
              "needs eval.inception_weights (the statistics are Inception features)")
        check(self.kid_subsets > 0 and self.kid_subset_size > 1, "eval.kid_subsets",
              "kid_subsets must be > 0 and kid_subset_size > 1")


@dataclass(frozen=True)
class DistConfig:
    """Distributed execution through DeepSpeed."""

    zero_stage: int = doc(0, "DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3.")
    offload_optimizer: bool = doc(False, "Keep optimizer state in CPU memory (ZeRO stage >= 1).")
    backend: Literal["auto", "nccl", "gloo"] = doc("auto", "Collective backend; 'auto' is nccl on GPU, gloo on CPU.")
    timeout_s: int = doc(600, "Seconds a collective may wait before the job fails with an error instead of hanging.")
    deepspeed_config: str = doc("", "Path to a DeepSpeed JSON merged over the generated one (expert override).")

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "dist.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        check(not self.offload_optimizer or self.zero_stage >= 1, "dist.offload_optimizer",
              "needs dist.zero_stage >= 1")
        check(self.timeout_s > 0, "dist.timeout_s", f"must be > 0 seconds, got {self.timeout_s}")


@dataclass(frozen=True)
class CkptConfig:
    """Checkpointing under RUN_DIR/checkpoints."""

    every_steps: int = doc(1000, "Optimizer steps between checkpoints (one is also written at the end).")
    keep_last: int = doc(3, "Complete checkpoints kept; older ones are deleted. 0 keeps all.")
    resume: str = doc("auto", "'auto' resumes from RUN_DIR/checkpoints/latest if present; 'never' refuses to "
                              "reuse a run dir that has checkpoints; or a path to a checkpoint directory.")
    init_from: str = doc("", "Checkpoint (RUN_DIR or RUN_DIR/checkpoints/step_XXXXXXXX) whose consolidated weights "
                             "(EMA when present) initialise the model; not the optimizer, step or data position.")
    preempt_exit_code: int = doc(0, "Exit code after SIGTERM/SIGUSR1 made the run checkpoint at the next step and "
                                    "stop. 0 reads as success to every launcher; e.g. 75 (EX_TEMPFAIL) lets a SLURM "
                                    "batch script requeue itself (srun passes it on; torchrun reports any non-zero "
                                    "code of a worker as 1).")

    def __post_init__(self) -> None:
        check(self.every_steps > 0, "ckpt.every_steps", f"must be > 0, got {self.every_steps}")
        check(self.keep_last >= 0, "ckpt.keep_last", f"must be >= 0, got {self.keep_last}")
        check(0 <= self.preempt_exit_code <= 255, "ckpt.preempt_exit_code",
              f"must be an exit code in 0..255, got {self.preempt_exit_code}")


@dataclass(frozen=True)
class LogConfig:
    """Where progress and metrics go (rank 0 only)."""

    tensorboard: bool = doc(True, "Write TensorBoard event files to RUN_DIR/tensorboard.")
    progress_bar: bool = doc(True, "Show a progress bar with step, loss, lr and samples/s.")


@dataclass(frozen=True)
class Config:
    """A whole run. `model` is the stage's own model-config dataclass (see the stage registry)."""

    stage: str = doc("", "Stage kind to train: one of pipeline.registry.STAGES.")
    model: Any = doc(None, "Stage-specific model configuration.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Data source and transforms."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "Optimizer and LR schedule."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "Training loop."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Held-out evaluation."})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"doc": "Distributed execution."})
    ckpt: CkptConfig = field(default_factory=CkptConfig, metadata={"doc": "Checkpointing."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": "Logging."})


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def compile_shapes(cfg: Config) -> str:
    """train.compile_shapes resolved: 'dynamic' | 'static' | 'default' (torch's own: 'auto' without buckets)."""
    policy = cfg.train.compile_shapes
    if policy == "auto":
        return "dynamic" if cfg.data.buckets.enabled else "default"
    return policy


def _model_config_class(stage: Any, source: str) -> type:
    if not isinstance(stage, str) or not stage:
        raise ConfigError(f"{source}: top-level key 'stage' is required; valid stages: {', '.join(sorted(STAGES))}")
    return model_config_class(stage, source)


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
    return key.strip(), value


def _apply_override(raw: dict, key: str, value: str, model_cls: type) -> None:
    """Set `key` (dotted) in the raw dict, parsing `value` to the type of the schema field it names."""
    parts = key.split(".")
    if parts[0] == "stage":
        tp: Any = str
    elif parts[0] == "model":
        tp = resolve_field_type(model_cls, parts[1:], "model", source=f"--set {key}")
    else:
        tp = resolve_field_type(Config, parts, "", source=f"--set {key}")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = parse_override_value(value, tp, key)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Load a YAML run config (or start from `base`), apply ``KEY=VALUE`` overrides, and validate strictly.

    Raises:
        ConfigError: unreadable file, unknown key (with the closest valid key), wrong type or invalid value.
    """
    source = str(path) if path is not None else "<config>"
    raw: dict = dict(base or {})
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config file ({exc.strerror or exc})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw.update(loaded or {})
    pairs = [_split_override(o) for o in overrides]
    for key, value in pairs:
        if key == "stage":
            raw["stage"] = value.strip()
    model_cls = _model_config_class(raw.get("stage"), source)
    for key, value in pairs:
        _apply_override(raw, key, value, model_cls)
    return from_dict(Config, raw, source=source, overrides={"model": model_cls})


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; `load_config` of this text gives back an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    tmp.replace(path)


def config_from_text(text: str, source: str = "<text>") -> Config:
    """Parse a config from YAML text (e.g. the resolved config stored in a checkpoint)."""
    loaded = yaml.safe_load(text) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    model_cls = _model_config_class(loaded.get("stage"), source)
    return from_dict(Config, loaded, source=source, overrides={"model": model_cls})
