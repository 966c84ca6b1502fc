"""Our hot paths next to what a user would write or pick instead: the same work, timed in one run, ratios printed.

    python benchmarks/peers.py                 # CPU: the demo's base U-Net; a few steps each (under 2 minutes)
    python benchmarks/peers.py --steps 40 --rounds 5 --out peers.md
    python benchmarks/peers.py --train-config configs/unet/latent256_sd2.yaml --random-autoencoder \
        configs/autoencoder/kl_f8.yaml --batch 8            # GPU: a real-size latent U-Net

Rows (each "ours / theirs": below 1 we are faster):

- training step: the Trainer's optimizer step (pipeline.train.setup.build_training + StepRunner + EMA, exactly what
  ``python -m pipeline train`` runs per step, at ZeRO-0 and ZeRO-2) against the loop diffusers' text-to-image
  training example runs: the same diffusers U-Net and initial weights, the same batch, frozen T5 in the step, CFG
  dropout, ``DDPMScheduler.add_noise`` / ``get_velocity``, min-SNR weights (``compute_snr``), AdamW with the same
  settings, gradient clipping, an LR scheduler step and ``EMAModel.step``; same precision. Timed in alternating
  rounds (ours, theirs, ours, ...), medians of the rounds, so a drift of the machine hits both.
- data: our streaming loader (``build_train_loader``) against a plain ``webdataset.WebDataset(...).shuffle().decode("pil")``
  + resize/random-crop + the same tokenizer + ``torch.utils.data.DataLoader``, on the same photo-like JPEG shards,
  at 64 and 256 px: images/s and images per CPU-second of all loader processes (per core).
- sampling: ``Text2Image.generate`` through an exported bundle against the same exported components in a plain
  diffusers loop (``UNet2DConditionModel.from_pretrained``, ``DPMSolverMultistepScheduler.from_pretrained`` of the
  bundle's scheduler config, ``T5EncoderModel``, CFG as one batch of 2N, ``scale_model_input`` / ``step``): seconds
  per image at equal steps and guidance.
- attention (CUDA only): benchmarks/attention.py's table (our Triton kernel vs SDPA flash / mem-efficient vs
  xformers, with and without a T5 padding mask, forward and forward+backward).

Goals (benchmarks/RESULTS.md): training step <= 1.03x the plain loop, loader >= 1.0x the plain pipeline (images per
CPU-second), sampling <= 1.05x the plain loop.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without `make setup`

import pipeline  # noqa: E402,F401  (the CPU-torch import fixes before diffusers / open_clip)
import data_loader  # noqa: E402
import train_throughput as throughput  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.machine import describe  # noqa: E402
from pipeline.train.entry import local_process_group  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = REPO / "configs" / "demo" / "unet_base.yaml"
GOALS = {"train": 1.03, "data": 1.0, "sampling": 1.05}


@dataclasses.dataclass
class Row:
    """One comparison: what was timed, our figure, theirs, the unit and whether lower is better."""

    section: str
    case: str
    ours: float
    theirs: float
    unit: str
    lower_is_better: bool = True

    @property
    def ratio(self) -> float:
        """ours / theirs in cost terms: below 1 we are faster (rates are inverted)."""
        return self.ours / self.theirs if self.lower_is_better else self.theirs / self.ours


def alternate(ours: Callable[[], None], theirs: Callable[[], None], rounds: int, steps: int) -> tuple[float, float]:
    """Median seconds per call of each, timed in alternating rounds of `steps` calls (one warm-up call each)."""
    ours()
    theirs()
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(rounds):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
    return statistics.median(times["ours"]), statistics.median(times["theirs"])


# -------------------------------------------------------------------------------------------- training
class PlainLoop:
    """diffusers' train_text_to_image.py step for a v-prediction pixel (or precomputed-latent) U-Net on T5 tokens.

    Built from our stage's network (same architecture, copied initial weights, diffusers' default attention
    processor) and config (optimizer settings, schedule, CFG dropout, min-SNR gamma, EMA decay)."""

    def __init__(self, bench: throughput.Bench) -> None:
        from diffusers import DDPMScheduler
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.training_utils import EMAModel

        cfg, stage = bench.cfg, bench.stage
        self.cfg, self.stage = cfg, stage
        self.unet = copy.deepcopy(bench.parts["unet"].module).train()
        self.unet.set_attn_processor(AttnProcessor2_0())
        self.t5 = bench.frozen.get("t5")
        diffusion = cfg.model.diffusion
        schedule = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}
        self.scheduler = DDPMScheduler(num_train_timesteps=diffusion.num_timesteps,
                                       beta_schedule=schedule.get(diffusion.schedule, "squaredcos_cap_v2"),
                                       prediction_type="v_prediction")
        optim = cfg.optim
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.lr = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.ema = EMAModel(self.unet.parameters(), decay=cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.batches = bench.batches
        self.device, self.dtype = bench.dist.device, bench.precision.dtype
        self.unet.to(self.dtype)  # the Trainer's precision: bf16 weights on GPU (ZeRO's bf16 mode), fp32 on CPU

    def step(self) -> None:
        from diffusers.training_utils import compute_snr

        batch = next(self.batches)
        mcfg = self.cfg.model
        if mcfg.space == "latent":  # precomputed latents, as the example's --cache of VAE outputs
            x0 = batch["latent"].to(self.device).float()
        else:
            x0 = batch["image"].to(self.device).float() / 127.5 - 1.0
        mask = batch["t5_mask"].to(self.device)
        if self.t5 is None:  # precomputed T5 tokens, as the example's cached text embeddings
            text = batch["t5_emb"].to(self.device).float() * mask[..., None]
        else:
            with torch.no_grad():
                text = self.t5(batch["t5_ids"].to(self.device), mask)
        drop = torch.rand(x0.shape[0], device=self.device) < mcfg.cond_drop_prob
        text = text * (~drop)[:, None, None]
        pooled = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t)
        pred = self.unet(noisy.to(self.dtype), t, encoder_hidden_states=text.to(self.dtype),
                         class_labels=pooled.to(self.dtype), encoder_attention_mask=mask).sample
        snr = compute_snr(self.scheduler, t)
        weights = torch.clamp(snr, max=mcfg.diffusion.min_snr_gamma) / (snr + 1)
        loss = ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).mul(weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.optim.grad_clip or float("inf"))
        self.optimizer.step()
        self.lr.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.unet.parameters())


def training_rows(cfg: Config, name: str, rounds: int, steps: int) -> list[Row]:
    """Our Trainer step at ZeRO-0 and ZeRO-2 against the plain loop, each in its own timed rounds."""
    from pipeline.train.backend import process_group, select_device
    from pipeline.train.launch_env import deepspeed_environment, detect_launch_env

    model = cfg.model
    if (cfg.stage != "unet" or model.super_res.low_res or model.image_embed.dim
            or (model.space == "latent" and model.latent_source != "precomputed")):
        raise SystemExit("--train-config: a unet base stage conditioned on T5 alone, in pixel space or on precomputed "
                         "latents (the plain loop of the diffusers example has no super-resolution or unCLIP input)")
    rows = []
    env = detect_launch_env()
    with deepspeed_environment(env), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.ERROR)
        device = select_device(env)
        for zero in (0, 2):
            run = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, zero_stage=zero))
            with process_group(env, run, device) as dist:
                bench = throughput.build(run, dist, "synthetic")
                plain = PlainLoop(bench)
                step = iter(range(10**9))
                ours, theirs = alternate(lambda: throughput.train_step(bench, next(step)), plain.step, rounds, steps)
            batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
            rows.append(Row("train", f"{name}, batch {batch}, ZeRO-{zero}", ours * 1e3, theirs * 1e3, "ms/step"))
    return rows


# ------------------------------------------------------------------------------------------------ data
def plain_loader(urls: str, size: int, batch: int, workers: int, tokenize) -> Iterator[dict]:
    """The pipeline a webdataset user writes: shuffle buffer, PIL decode, resize the short side, random crop, uint8
    tensors, batched in the workers."""
    import random

    import numpy as np
    import webdataset as wds
    from PIL import Image

    def crop(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = random.randint(0, width - size), random.randint(0, height - size)
        array = np.asarray(image.crop((left, top, left + size, top + size)))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def collate(samples: list) -> dict:
        images, captions = zip(*samples)
        return {"image": torch.stack(images), "caption": list(captions), **tokenize(list(captions))}

    shards = sorted(str(p) for p in Path(urls).glob("*.tar"))
    dataset = (wds.WebDataset(shards, shardshuffle=len(shards), nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .repeat().shuffle(256).decode("pil").to_tuple("jpg;png;webp", "txt").map_tuple(crop, str)
               .batched(batch, collation_fn=collate))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))


def rate(batches: Iterator[dict], count: int, size: int) -> float:
    """Images per CPU-second of this process and its live children, over `count` batches after a warm-up."""
    for _ in range(4):
        next(batches)
    (main0, kids0), images = data_loader._cpu_seconds(), 0
    for _ in range(count):
        batch = next(batches)
        images += batch["image"].shape[0]
    main1, kids1 = data_loader._cpu_seconds()
    assert batch["image"].shape[-2:] == (size, size) and batch["image"].dtype == torch.uint8
    return images / ((main1 - main0) + (kids1 - kids0))


def data_rows(samples: int, batches: int, workers: int) -> list[Row]:
    from pipeline.config import DataConfig
    from pipeline.data.loader import build_train_loader
    from pipeline.data.spec import SampleSpec

    tokenize = data_loader.clip_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_loader.write_shards(Path(tmp), samples, 256, shard_size=max(1, samples // 8))
        for size in (64, 256):
            data = DataConfig(urls=tmp, num_workers=workers, shuffle_buffer=256, crop="random")
            ours_loader = build_train_loader(data, SampleSpec(image_size=size, tokenize=tokenize), batch_size=64,
                                             seed=0, rank=0, world_size=1)
            ours = rate(iter(ours_loader), batches, size)
            ours_loader.close()
            theirs = rate(plain_loader(tmp, size, 64, workers, tokenize), batches, size)
            rows.append(Row("data", f"256 px JPEGs -> {size} px, {workers} worker(s), square", ours, theirs,
                            "images per CPU-s", lower_is_better=False))
    return rows


# -------------------------------------------------------------------------------------------- sampling
def tiny_bundle(cfg_path: Path, root: Path) -> Path:
    """A bundle holding the config's base stage after one training step on synthetic shards (speed does not depend
    on the weights)."""
    from pipeline.data.synthetic import write_synthetic_shards
    from pipeline.export import export_run
    from pipeline.train.entry import run_training

    shards = root / "shards"
    write_synthetic_shards(shards, 64, 64, 64, 0, "train", "png")
    cfg = load_config(cfg_path, [f"data.urls={shards}", "data.eval_urls=", "data.num_workers=0",
                                 "train.max_steps=1", "train.sample_every=0", "eval.every_steps=0",
                                 "ckpt.every_steps=1", "log.progress_bar=false", "log.tensorboard=false"])
    assert run_training(cfg, root / "run") == 0
    export_run(root / "run", root / "bundle")
    return root / "bundle"


class PlainSampler:
    """The exported components in a plain diffusers loop, as a diffusers user would write it."""

    def __init__(self, bundle: Path) -> None:
        import json

        from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, T5EncoderModel

        folder = bundle / "unet_base"
        self.unet = UNet2DConditionModel.from_pretrained(str(folder)).eval()
        self.scheduler = DPMSolverMultistepScheduler.from_pretrained(str(folder / "scheduler"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(bundle / "t5"))
        self.t5 = T5EncoderModel.from_pretrained(str(bundle / "t5")).eval()
        self.max_length = json.loads((bundle / "bundle.json").read_text())["components"]["unet_base"]["t5"][
            "max_length"]

    @torch.no_grad()
    def __call__(self, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
        tokens = self.tokenizer(prompts, max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        mask = tokens.attention_mask.bool()
        text = self.t5(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        text = text * mask[..., None]
        null_text, null_mask = torch.zeros_like(text), torch.zeros_like(mask)
        null_mask[:, 0] = True
        texts, masks = torch.cat([text, null_text]), torch.cat([mask, null_mask])
        pooled = (texts * masks[..., None]).sum(1) / masks.sum(1, keepdim=True)
        config = self.unet.config
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(len(prompts), config.in_channels, config.sample_size, config.sample_size,
                        generator=generator) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            x_in = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            out = self.unet(x_in, t, encoder_hidden_states=texts, class_labels=pooled,
                            encoder_attention_mask=masks).sample
            cond, uncond = out.chunk(2)
            x = self.scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        return x.clamp(-1, 1)


def sampling_rows(cfg_path: Path, images: int, steps: int, rounds: int) -> list[Row]:
    from pipeline.sampling.text2image import Text2Image

    with tempfile.TemporaryDirectory() as tmp:
        bundle = tiny_bundle(cfg_path, Path(tmp))
        ours, theirs = Text2Image.from_bundle(bundle), PlainSampler(bundle)
        prompts = [throughput.CAPTIONS[i % len(throughput.CAPTIONS)] for i in range(images)]
        mine, plain = alternate(lambda: ours.generate(prompts, steps=steps, guidance=3.0, seed=0),
                                lambda: theirs(prompts, steps, 3.0, 0), rounds, 1)
    return [Row("sampling", f"base stage of {cfg_path.name}, {images} images x {steps} steps, CFG 3",
                mine / images, plain / images, "s/image")]


# ----------------------------------------------------------------------------------------------- table
def versions() -> str:
    import deepspeed
    import diffusers
    import webdataset

    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, deepspeed {deepspeed.__version__}, "
            f"webdataset {getattr(webdataset, '__version__', '?')}")


def table(rows: list[Row], note: str) -> str:
    lines = [f"# peers: {describe(torch.device('cuda') if torch.cuda.is_available() else None)}, "
             f"{torch.get_num_threads()} torch thread(s); {versions()}; {datetime.date.today().isoformat()}",
             f"# {note}", "",
             "| section | case | ours | theirs | unit | ours/theirs (cost) | goal |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        goal = GOALS[row.section]
        met = "met" if row.ratio <= (goal if row.lower_is_better else 1 / goal) + 1e-9 else "MISSED"
        bound = f"<= {goal:.2f}x" if row.lower_is_better else f"<= {1 / goal:.2f}x"
        lines.append(f"| {row.section} | {row.case} | {row.ours:.4g} | {row.theirs:.4g} | {row.unit} | "
                     f"{row.ratio:.3f}x | {bound} {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-config", type=Path, default=DEFAULT_TRAIN)
    parser.add_argument("--set", action="extend", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--random-autoencoder", metavar="AE_CONFIG", help="as benchmarks/train_throughput.py")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch of the training rows (default: config)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per timed round (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (default 3)")
    parser.add_argument("--data-samples", type=int, default=400, help="JPEGs written for the data rows")
    parser.add_argument("--data-batches", type=int, default=20, help="batches of 64 timed per loader")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of both loaders (default 1)")
    parser.add_argument("--sample-images", type=int, default=8)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--only", default="train,data,sampling,attention",
                        help="sections to run, comma separated (attention needs CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the demo's chains run one thread each; a shared CPU makes 2 threads noisy
    only = set(args.only.split(","))
    overrides = [*args.overrides, "data.eval_urls=", "data.num_workers=0"]
    if args.batch:
        overrides.append(f"train.micro_batch_size={args.batch}")
    if args.random_autoencoder:
        overrides.append(f"model.autoencoder={throughput.random_autoencoder(args.random_autoencoder)}")
    cfg = load_config(args.train_config, overrides)
    rows: list[Row] = []
    with local_process_group():  # one group for every engine built here (DeepSpeed caches the first one)
        if "train" in only:
            rows += training_rows(cfg, args.train_config.name, args.rounds, args.steps)
        if "data" in only:
            rows += data_rows(args.data_samples, args.data_batches, args.workers)
        if "sampling" in only:
            rows += sampling_rows(args.train_config, args.sample_images, args.sample_steps, args.rounds)
    text = table(rows, f"medians of {args.rounds} alternating rounds; training {args.steps} steps per round")
    if torch.cuda.is_available() and "attention" in only:
        text += "\n" + subprocess.run([sys.executable, str(Path(__file__).with_name("attention.py"))],
                                      capture_output=True, text=True, check=False).stdout
    print(text, end="")
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
