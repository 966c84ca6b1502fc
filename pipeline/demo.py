"""The embedded default job: synthetic shards -> every implemented stage trained tiny -> export -> figures.

Runs on a 2-core CPU in minutes. Re-running it reuses finished shards and runs (training resumes from its
checkpoint and stops at once when it is complete), so an interrupted demo continues where it stopped.
What is not implemented yet is said plainly at the end instead of being faked.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data.synthetic import HELDOUT_TUPLES, TRAIN_TUPLES, SceneObject, write_synthetic_shards
from pipeline.errors import PipelineError

RESOLUTION = 64
SHARD_SIZE = 1024
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
NOT_YET = "latent autoencoder, diffusion prior, U-Net cascade with T5, sampling"


@dataclass(frozen=True)
class DemoSize:
    """How much data and training the demo uses; `FULL` is the real demo, tests run a smoke-sized one."""

    train_samples: int = 8192
    heldout_samples: int = 512
    clip_overrides: tuple[str, ...] = ()  # --set style overrides applied over configs/demo/clip.yaml


FULL = DemoSize()


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def make_demo_shards(out: Path, size: DemoSize) -> tuple[Path, Path]:
    """Write (or reuse) the demo's train and held-out shards under `out/shards`."""
    train_dir, heldout_dir = out / "shards" / "train", out / "shards" / "heldout"
    for directory, n, split, seed in ((train_dir, size.train_samples, "train", 0),
                                      (heldout_dir, size.heldout_samples, "heldout", 1)):
        index = directory / "shards.json"
        if not index.exists() or json.loads(index.read_text()).get("num_samples") != n:
            write_synthetic_shards(directory, n, SHARD_SIZE, RESOLUTION, seed, split)
    return train_dir, heldout_dir


def _demo_config(name: str, overrides: list[str]):
    path = CONFIGS / f"{name}.yaml"
    if not path.exists():
        raise PipelineError(f"demo config {path} is missing; run the demo from a checkout of the repository")
    return load_config(path, overrides)


def train_clip(out: Path, train_dir: Path, heldout_dir: Path, size: DemoSize) -> dict:
    """Train the tiny CLIP (resuming if a run exists) and return its last metrics record with eval figures."""
    from pipeline.train.entry import run_training

    run_dir = out / "runs" / "clip"
    cfg = _demo_config("clip", [f"data.urls={train_dir}", f"data.eval_urls={heldout_dir}", *size.clip_overrides])
    code = run_training(cfg, run_dir)
    if code != 0:
        raise PipelineError(f"CLIP training stopped with exit code {code}; re-run the demo to resume")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in records if "eval/t2i_recall@1" in r]
    if not evals:
        raise PipelineError(f"no evaluation record in {run_dir / 'metrics.jsonl'}")
    return {"first": evals[0], "last": evals[-1], "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"],
            "pool": cfg.eval.batch_size}


def _heldout_single_objects(heldout_dir: Path, limit: int) -> list[tuple[Image.Image, SceneObject]]:
    """Held-out single-object scenes (image, object) read straight from the tar shards."""
    from pipeline.data.tar_reader import iter_shard

    def unreadable(reason: str, detail: str) -> None:
        raise PipelineError(f"demo held-out shards: {reason}: {detail}")

    found: list[tuple[Image.Image, SceneObject]] = []
    for shard in sorted(heldout_dir.glob("*.tar")):
        for _, _, sample in iter_shard(str(shard), unreadable):
            objects = json.loads(sample["json"])["objects"]
            if len(objects) == 1:
                found.append((Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), SceneObject(**objects[0])))
            if len(found) == limit:
                return found
    return found


def probe_exported_clip(clip_dir: Path, heldout_dir: Path) -> dict[str, float]:
    """Load the export with open_clip itself and measure zero-shot attribute accuracy on unseen scenes."""
    import open_clip

    from pipeline.eval.attributes import attribute_accuracy

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    scenes = _heldout_single_objects(heldout_dir, 256)
    with torch.no_grad():
        images = torch.stack([preprocess(image) for image, _ in scenes])
        features = model.encode_image(images, normalize=True)
        sums = attribute_accuracy(features, [obj for _, obj in scenes],
                                  lambda captions: model.encode_text(tokenizer(captions), normalize=True))
    return {attribute: hits / count for attribute, (hits, count) in sums.items()} | {"scenes": len(scenes)}


def _report_clip(figures: dict, probe: dict[str, float]) -> None:
    from pipeline.eval.attributes import chance_levels

    first, last, pool = figures["first"], figures["last"], figures["pool"]
    _say(f"CLIP loss {figures['loss_first']:.3f} -> {figures['loss_last']:.3f}")
    _say(f"held-out retrieval (captions never seen in training, pools of {pool}, chance ~{1 / pool:.3f}):")
    for key in ("t2i_recall@1", "t2i_recall@5", "i2t_recall@1", "i2t_recall@5"):
        _say(f"  {key:<14} step {first['step']:>4}: {first['eval/' + key]:.3f}   "
             f"step {last['step']:>4}: {last['eval/' + key]:.3f}")
    chance = chance_levels()
    _say(f"zero-shot attributes of {int(probe['scenes'])} held-out single-object scenes, exported model "
         f"loaded by open_clip:")
    for attribute, level in chance.items():
        _say(f"  {attribute:<9} accuracy {probe[attribute]:.3f}   (chance {level:.3f})")


def run_demo(out: Path, size: DemoSize = FULL) -> int:
    """Run every implemented part of the pipeline on the embedded synthetic data; returns the exit code."""
    from pipeline.export import export_run

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    train_dir, heldout_dir = make_demo_shards(out, size)
    _say(f"shards: {size.train_samples} train / {size.heldout_samples} held-out samples at {RESOLUTION} px "
         f"({len(TRAIN_TUPLES)} train / {len(HELDOUT_TUPLES)} held-out object combinations) in {out / 'shards'}")
    _say("training CLIP (configs/demo/clip.yaml)")
    figures = train_clip(out, train_dir, heldout_dir, size)
    bundle = out / "bundle"
    export_run(out / "runs" / "clip", bundle)
    _say(f"exported {bundle / 'clip'} (open_clip local-dir format)")
    _report_clip(figures, probe_exported_clip(bundle / "clip", heldout_dir))
    _say(f"not in this version yet: {NOT_YET}")
    _say(f"done in {time.time() - start:.0f} s; outputs in {out}")
    return 0
