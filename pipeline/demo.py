"""The embedded default job (``python -m pipeline demo``, what ``make demo`` runs): synthetic shards -> CLIP ->
autoencoder -> prior -> base U-Net (pixels, T5 + CLIP image embedding) -> super-resolution U-Net (latents of the
autoencoder) -> one export bundle -> held-out prompts sampled through the whole cascade -> a report of what every
model learned, measured on data no model trained on.

Every stage trains through the one Trainer with its tiny config in configs/demo/. Re-running resumes unfinished
runs and skips finished ones (a finished run resumes at its last step and stops at once; export, precompute and
shards are reused or cheap). Uses a GPU when one is present.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data.synthetic import HELDOUT_TUPLES, TRAIN_TUPLES, SceneObject, write_synthetic_shards
from pipeline.errors import PipelineError

RESOLUTION = 64
SHARD_SIZE = 1024
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
STAGES = ("clip", "autoencoder", "prior", "unet_base", "unet_sr")


@dataclass(frozen=True)
class DemoSize:
    """How much data, training and sampling the demo uses; `FULL` is the real demo, tests run a smoke-sized one.

    overrides: per stage (a name of STAGES), --set style overrides applied over its configs/demo YAML.
    """

    train_samples: int = 8192
    heldout_samples: int = 512
    prompts: int = 128  # held-out prompts sampled through the cascade for the fidelity figures
    variations: int = 32  # held-out images whose DALL-E 2 variations are scored
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sample_steps: int | None = None  # None: each stage's own default


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


class Demo:
    """One demo run in `out`: trains, exports and reports stage by stage (see the module docstring)."""

    def __init__(self, out: Path, size: DemoSize) -> None:
        self.out, self.size = out, size
        self.bundle = out / "bundle"
        self.seconds: dict[str, float] = {}
        self.train_dir, self.heldout_dir = make_demo_shards(out, size)

    def train(self, name: str, config: str, extra: list[str]) -> list[dict]:
        """Train stage `name` with configs/demo/<config>.yaml (resuming), export it; returns its metric records."""
        from pipeline.export import export_run
        from pipeline.train.entry import run_training

        path = CONFIGS / f"{config}.yaml"
        if not path.exists():
            raise PipelineError(f"demo config {path} is missing; run the demo from a checkout of the repository")
        data = [f"data.urls={self.train_dir}", f"data.eval_urls={self.heldout_dir}"]
        cfg = load_config(path, [*data, *extra, *self.size.overrides.get(name, ())])
        run_dir = self.out / "runs" / name
        start = time.time()
        code = run_training(cfg, run_dir)
        if code != 0:
            raise PipelineError(f"{name} training stopped with exit code {code}; re-run the demo to resume")
        export_run(run_dir, self.bundle)
        self.seconds[name] = time.time() - start
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]

    def precompute_clip_images(self) -> tuple[Path, Path]:
        """CLIP image embeddings of every train and held-out image (what the unCLIP stage conditions on), in
        out/precomputed/{train,heldout}; recomputed when the exported CLIP changed."""
        import shutil

        from pipeline.data.precompute import PrecomputeJob, run_precompute

        start = time.time()
        root = self.out / "precomputed"
        digest = json.loads((self.bundle / "bundle.json").read_text())["components"]["clip"]["files"][
            "open_clip_model.safetensors"]["sha256"]
        stamp = root / "clip.sha256"
        if root.exists() and (not stamp.is_file() or stamp.read_text().strip() != digest):
            shutil.rmtree(root)  # arrays of another CLIP
        root.mkdir(parents=True, exist_ok=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for split, src in (("train", self.train_dir), ("heldout", self.heldout_dir)):
            run_precompute(PrecomputeJob(str(src), root / split, (f"clip-image:{self.bundle / 'clip'}",), 256,
                                         device))
        stamp.write_text(digest + "\n")
        self.seconds["precompute"] = time.time() - start
        return root / "train", root / "heldout"


def _last_eval(records: list[dict], key: str) -> dict:
    found = [r for r in records if key in r]
    if not found:
        raise PipelineError(f"no evaluation record with {key!r} in a demo run's metrics.jsonl")
    return found[-1]


def heldout_prompts(heldout_dir: Path, limit: int) -> list[tuple[str, Image.Image, list[SceneObject]]]:
    """The first `limit` held-out samples as (caption, image, objects), read straight from the tar shards."""
    from pipeline.data.tar_reader import iter_shard

    def unreadable(reason: str, detail: str) -> None:
        raise PipelineError(f"demo held-out shards: {reason}: {detail}")

    found = []
    for shard in sorted(heldout_dir.glob("*.tar")):
        for _, _, sample in iter_shard(str(shard), unreadable):
            objects = [SceneObject(**o) for o in json.loads(sample["json"])["objects"]]
            image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
            found.append((sample["txt"].decode("utf-8"), image, objects))
            if len(found) == limit:
                return found
    return found


def sample_heldout(demo: Demo) -> dict:
    """Sample held-out prompts through the exported bundle with guidance on and off; fidelity of both."""
    from pipeline.eval.fidelity import fidelity_sums, validate_on_real
    from pipeline.sample import Text2Image, save_grid, to_pil

    scenes = heldout_prompts(demo.heldout_dir, demo.size.prompts)
    prompts = [caption for caption, _, _ in scenes]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.time()
    t2i = Text2Image.from_bundle(demo.bundle, device)
    guided = t2i.generate(prompts, seed=0, steps=demo.size.sample_steps)
    plain = t2i.generate(prompts, seed=0, steps=demo.size.sample_steps, guidance=1.0)
    # DALL-E 2 variations of held-out images: the image's CLIP embedding alone (no text); do they keep its colours?
    variations = torch.cat([t2i.variations(image, num_images=1, seed=i, steps=demo.size.sample_steps)
                            for i, (_, image, _) in enumerate(scenes[:demo.size.variations])])
    demo.seconds["sampling"] = time.time() - start
    figures = {}
    objects = [objects for _, _, objects in scenes]
    for suffix, images in (("", guided), ("_no_guidance", plain), ("_variations", variations)):
        sums = fidelity_sums(((images.float().cpu() + 1) / 2).clamp(0, 1), objects[:len(images)])
        figures.update({f"fidelity_{k}{suffix}": hits / count for k, (hits, count) in sums.items()})
    side = guided.shape[-1]
    reals = [image.resize((side, side), Image.BICUBIC) for _, image, _ in scenes[:16]]
    tiles = [tile for real, g, p in zip(reals, to_pil(guided[:16]), to_pil(plain[:16])) for tile in (real, g, p)]
    save_grid(tiles, demo.out / "samples.png")
    (demo.out / "samples").mkdir(exist_ok=True)  # each guided image, for bit-for-bit reproduction checks
    for i, image in enumerate(to_pil(guided)):
        image.save(demo.out / "samples" / f"guided_{i:03d}.png")
    (demo.out / "samples" / "prompts.json").write_text(json.dumps({"prompts": prompts, "seed": 0,
                                                                   "steps": demo.size.sample_steps}, indent=1))
    checker = validate_on_real(256, side)
    return {**figures, "checker_colour_on_real": checker["colour"], "checker_position_on_real": checker["position"],
            "prompts": len(prompts), "variations": len(variations)}


def run_demo(out: Path, size: DemoSize = FULL) -> int:
    """Run the whole pipeline on the embedded synthetic data (see the module docstring); returns the exit code."""
    from pipeline.train.entry import local_process_group

    with local_process_group():  # five training runs in this one process
        return _run_demo(out, size)


def _run_demo(out: Path, size: DemoSize) -> int:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, size)
    _say(f"shards: {size.train_samples} train / {size.heldout_samples} held-out samples at {RESOLUTION} px "
         f"({len(TRAIN_TUPLES)} train / {len(HELDOUT_TUPLES)} held-out object combinations) in {out / 'shards'}")
    report: dict = {}
    _say("1/5 CLIP (configs/demo/clip.yaml)")
    clip = _last_eval(demo.train("clip", "clip", []), "eval/t2i_recall@1")
    report["clip_t2i_recall_at_1"] = clip["eval/t2i_recall@1"]
    _say("    CLIP image embeddings of every image for the unCLIP stage (shards precompute)")
    pre_train, pre_heldout = demo.precompute_clip_images()
    _say("2/5 autoencoder (configs/demo/autoencoder.yaml)")
    ae = _last_eval(demo.train("autoencoder", "autoencoder", []), "eval/psnr")
    report.update(autoencoder_psnr=ae["eval/psnr"], autoencoder_latent_std=ae.get("eval/latent_std"))
    clip_dir = demo.bundle / "clip"
    _say("3/5 diffusion prior (configs/demo/prior.yaml)")
    prior = _last_eval(demo.train("prior", "prior", [f"model.clip={clip_dir}", "model.image_source=precomputed",
                                                     f"data.precomputed_urls={pre_train}",
                                                     f"data.eval_precomputed_urls={pre_heldout}"]), "eval/prior_cos")
    report.update(prior_cos=prior["eval/prior_cos"], baseline_cos=prior["eval/baseline_cos"],
                  prior_retrieval_at_1=prior.get("eval/prior_retrieval@1"))
    _say("4/5 base U-Net, 16 px, T5 + CLIP image embedding (configs/demo/unet_unclip.yaml)")
    demo.train("unet_base", "unet_unclip", [f"data.precomputed_urls={pre_train}",
                                            f"data.eval_precomputed_urls={pre_heldout}",
                                            f"model.image_embed.clip={clip_dir}"])
    _say("5/5 super-resolution U-Net, 16 -> 64 px in the autoencoder's latent space (configs/demo/unet_sr.yaml)")
    demo.train("unet_sr", "unet_sr", [f"model.autoencoder={demo.bundle / 'autoencoder'}"])
    _say(f"sampling {size.prompts} held-out prompts through the bundle, guidance on and off")
    report.update(sample_heldout(demo))
    report.update(seconds=time.time() - start, seconds_per_stage=demo.seconds, bundle=str(demo.bundle.resolve()))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(report, out)
    return 0


def print_report(report: dict, out: Path) -> None:
    def pct(key: str) -> str:
        return f"{100 * report[key]:.0f}%"

    _say("what the models learned (held-out data: object combinations no model saw in training):")
    _say(f"  CLIP text->image recall@1 in pools of 64: {report['clip_t2i_recall_at_1']:.3f} (chance 0.016)")
    _say(f"  autoencoder PSNR {report['autoencoder_psnr']:.1f} dB, scaled latents' std "
         f"{report['autoencoder_latent_std']:.2f}")
    _say(f"  prior: cosine to the true image embedding {report['prior_cos']:.3f} vs the text embedding's "
         f"{report['baseline_cos']:.3f}; retrieval@1 in pools of 64 {report['prior_retrieval_at_1']:.2f}")
    _say(f"  prompt fidelity of {report['prompts']} sampled images (64 px, whole cascade):")
    for attribute in ("colour", "position", "size", "shape"):
        _say(f"    {attribute:<8} guidance on {pct(f'fidelity_{attribute}'):>4}   off "
             f"{pct(f'fidelity_{attribute}_no_guidance'):>4}")
    _say(f"  variations of {report['variations']} held-out images (their CLIP image embedding, no text) keep their "
         f"colour in {pct('fidelity_colour_variations')}")
    _say(f"  (the checker scores real held-out images {pct('checker_colour_on_real')} colour, "
         f"{pct('checker_position_on_real')} position)")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds_per_stage"].items())
    _say(f"time: {report['seconds']:.0f} s ({stages})")
    _say(f"outputs: {out / 'samples.png'} (held-out image | guided | unguided), {out / 'report.json'}, "
         f"bundle {report['bundle']}")
    _say(f"sample it yourself: python -m pipeline sample {report['bundle']} --prompt \"a large red circle on the "
         f"left\" --out red.png --num-images 4")
