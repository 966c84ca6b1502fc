"""The embedded default job (``python -m pipeline demo``, what ``make demo`` runs): synthetic shards -> CLIP ->
autoencoder -> prior -> base U-Net (pixels, T5 + CLIP image embedding) -> super-resolution U-Net (latents of the
autoencoder) -> one export bundle -> held-out prompts sampled through the whole cascade -> a report of what every
model learned, measured on data no model trained on.

Every stage trains through the one Trainer with its tiny config in configs/demo/; the stages form two independent
chains (:data:`CHAINS`) that train side by side in two spawned processes, each stage's output in ``OUT/logs/``.
Re-running resumes unfinished runs and skips finished ones (a finished run resumes at its last step and stops at
once; export, precompute and shards are reused or cheap). Uses a GPU when one is present.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import queue
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pipeline.config import Config, load_config
from pipeline.data.synthetic import HELDOUT_TUPLES, TRAIN_TUPLES, SceneObject, write_synthetic_shards
from pipeline.data.tar_reader import iter_shard
from pipeline.errors import PipelineError
from pipeline.eval.clip_space import clip_space_figures
from pipeline.eval.fidelity import fidelity_sums, validate_on_real
from pipeline.export import export_run
from pipeline.machine import describe
from pipeline.models.frozen_clip import FrozenClip
from pipeline.precompute.run import PrecomputeJob, run_precompute
from pipeline.sampling.text2image import Text2Image, save_grid, to_pil, to_tensor
from pipeline.train.entry import local_process_group, run_training

RESOLUTION = 64
SHARD_SIZE = 1024
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
STAGE_CONFIGS = {"clip": "clip", "autoencoder": "autoencoder", "prior": "prior", "unet_base": "unet_unclip",
                 "unet_sr": "unet_sr"}  # stage -> configs/demo/<name>.yaml
# The stages form two chains that train side by side, each process on half of the cores. Measured on the 2-core
# demo machine: the small convolutional networks gain only 1.37x (base U-Net) to 1.45x (autoencoder) from a second
# thread, so two stages on one core each train ~1.4x faster than one after the other on both. The longest path is
# CLIP -> its image embeddings -> base U-Net, so that chain holds nothing else; the prior (which needs the
# embeddings too) trains in the other chain after the autoencoder, waiting for the precompute if it is not done yet
# (NEEDS). With the prior in the first chain, that chain ran ~50 s longer than the second.
CHAINS = (("clip", "precompute", "unet_base"), ("autoencoder", "prior", "unet_sr"))
NEEDS = {"precompute": ("clip",), "prior": ("precompute",), "unet_base": ("precompute",),
         "unet_sr": ("autoencoder",)}  # step -> the steps whose output it reads
PROGRESS_EVERY_S = 60.0


@dataclass(frozen=True)
class DemoSize:
    """How much data, training and sampling the demo uses; `FULL` is the real demo, tests run a smoke-sized one.

    overrides: per stage (a name of STAGE_CONFIGS), --set style overrides applied over its configs/demo YAML.
    """

    train_samples: int = 8192
    heldout_samples: int = 512
    prompts: int = 256  # held-out prompts sampled through the cascade for the fidelity figures (half the held-out
    # split: the figures' binomial noise is ~1.4x smaller than with 128)
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
        self.precomputed = out / "precomputed"
        self.logs = out / "logs"
        self.seconds: dict[str, float] = {}
        self.train_dir, self.heldout_dir = make_demo_shards(out, size)

    def stage_config(self, name: str) -> Config:
        """The config stage `name` trains with: configs/demo YAML + this demo's paths + the size's overrides."""
        path = CONFIGS / f"{STAGE_CONFIGS[name]}.yaml"
        if not path.exists():
            raise PipelineError(f"demo config {path} is missing; run the demo from a checkout of the repository")
        clip_dir = self.bundle / "clip"
        embeddings = [f"data.precomputed_urls={self.precomputed / 'train'}",
                      f"data.eval_precomputed_urls={self.precomputed / 'heldout'}"]
        extra = {"prior": [f"model.clip={clip_dir}", "model.image_source=precomputed", *embeddings],
                 "unet_base": [*embeddings, f"model.image_embed.clip={clip_dir}"],
                 "unet_sr": [f"model.autoencoder={self.bundle / 'autoencoder'}"]}.get(name, [])
        # A stage stopped by SIGTERM (the other chain failed, or the machine is going down) checkpoints and must not
        # read as finished: its chain stops there and the next demo run resumes it.
        return load_config(path, [f"data.urls={self.train_dir}", f"data.eval_urls={self.heldout_dir}", *extra,
                                  "ckpt.preempt_exit_code=75", *self.size.overrides.get(name, ())])

    def run_step(self, name: str) -> float:
        """Run one step of a chain (a stage of STAGE_CONFIGS, or "precompute"); returns its seconds."""
        start = time.time()
        if name == "precompute":
            self.precompute_clip_images()
        else:
            self.train(name)
        self.seconds[name] = time.time() - start
        return self.seconds[name]

    def train(self, name: str) -> None:
        """Train stage `name` (resuming) and export it into the bundle."""
        run_dir = self.out / "runs" / name
        code = run_training(self.stage_config(name), run_dir)
        if code != 0:
            raise PipelineError(f"{name} training stopped with exit code {code}; re-run the demo to resume")
        export_run(run_dir, self.bundle)

    def records(self, name: str) -> list[dict]:
        """The metric records of stage `name`'s run (metrics.jsonl); a line being written is left out."""
        path = self.out / "runs" / name / "metrics.jsonl"
        found = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return found

    def precompute_clip_images(self) -> None:
        """CLIP image embeddings of every train and held-out image (what the prior and the unCLIP stage train
        on), in out/precomputed/{train,heldout}; recomputed when the exported CLIP changed."""
        root = self.precomputed
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


def _log_to(path: Path) -> None:
    """Send this process's stdout and stderr (progress bars, warnings, tracebacks) to `path`, appended."""
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _train_chain(out: Path, size: DemoSize, chain: tuple[str, ...], threads: int, messages, finished: dict) -> None:
    """One chain of CHAINS, in the process :func:`train_chains` spawned for it: each step in order, once the steps
    it NEEDS that other chains run have set their event in `finished` (step -> multiprocessing Event); its output
    in out/logs/<step>.log; ("done", step, seconds) or ("error", step, message) to `messages`."""
    torch.set_num_threads(threads)
    demo = Demo(out, size)
    with local_process_group():  # the chain's training runs share this process's group
        for step in chain:
            for need in NEEDS.get(step, ()):
                if need in finished:  # a step no chain runs this time is done already
                    finished[need].wait()  # a failing chain gets the demo to terminate this one: no hang
            _log_to(demo.logs / f"{step}.log")
            try:
                seconds = demo.run_step(step)
            except PipelineError as error:
                messages.put(("error", step, str(error)))
                sys.exit(1)
            finished[step].set()
            messages.put(("done", step, seconds))


def train_chains(demo: Demo, chains: tuple[tuple[str, ...], ...] = CHAINS) -> None:
    """Train `chains` side by side, each in a spawned process with its share of the cores (CPU) or on the one GPU;
    progress and each finished step's held-out figure are printed here. A failing step stops the other chains (a
    training stage checkpoints first) and raises PipelineError naming the step and its output."""
    # spawn, not fork: this process may hold torch threads, and a forked child would inherit their locks
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    threads = max(1, len(os.sched_getaffinity(0)) // len(chains))
    finished = {step: context.Event() for chain in chains for step in chain}
    workers = [context.Process(target=_train_chain, args=(demo.out, demo.size, chain, threads, messages, finished),
                               name=f"demo-{chain[0]}") for chain in chains]
    pending = [list(chain) for chain in chains]
    each = " each, side by side" if len(chains) > 1 else ""
    _say(" | ".join(" -> ".join(chain) for chain in chains) + f" ({threads} CPU thread(s){each}; output in "
         f"{demo.logs}/)")
    for worker in workers:
        worker.start()
    try:
        next_progress = time.time() + PROGRESS_EVERY_S
        while any(pending):
            message = _next_message(messages, workers, pending, demo.logs)
            if message is None:
                if time.time() >= next_progress:
                    _say("  progress: " + ", ".join(_progress(demo, left[0]) for left in pending if left))
                    next_progress = time.time() + PROGRESS_EVERY_S
                continue
            kind, step, value = message
            if kind == "error":
                raise PipelineError(f"{value} (output: {demo.logs / f'{step}.log'})")
            for left in pending:
                if left and left[0] == step:
                    left.pop(0)
            demo.seconds[step] = value
            _say(f"  {step} done in {value:.0f} s{_figure(demo, step)}")
    finally:
        for worker in workers:  # SIGTERM: a training stage checkpoints and stops; the next demo run resumes it
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=300)
            if worker.is_alive():
                worker.kill()
                worker.join()
            worker.close()
        messages.close()  # its semaphores go now, not in a warning from the resource tracker at exit
        messages.join_thread()


def _next_message(messages, workers: list, pending: list[list[str]], logs: Path) -> tuple | None:
    """The next ("done" | "error", step, value) from the chains, or None after 2 s of silence; a chain process that
    exited with steps left and said nothing raises PipelineError naming its step and log."""
    try:
        return messages.get(timeout=2.0)
    except queue.Empty:
        pass
    for worker, left in zip(workers, pending):
        if left and worker.exitcode is not None:
            try:  # it may have sent its error just after the wait above gave up
                return messages.get(timeout=1.0)
            except queue.Empty:
                raise PipelineError(f"demo step {left[0]} crashed (exit code {worker.exitcode}); its output: "
                                    f"{logs / f'{left[0]}.log'}") from None
    return None


def _progress(demo: Demo, step: str) -> str:
    if step == "precompute":
        return "precompute"
    records = [r for r in demo.records(step) if "step" in r]
    done = records[-1]["step"] if records else 0
    return f"{step} {done}/{demo.stage_config(step).train.max_steps}"


FIGURES = {"clip": ("eval/t2i_recall@1", "text->image recall@1"), "autoencoder": ("eval/psnr", "PSNR"),
           "prior": ("eval/prior_cos", "cosine to the image embedding"),
           "unet_base": ("eval/fidelity_colour", "colour fidelity of its own samples"),
           "unet_sr": ("eval/fidelity_colour", "colour fidelity upsampling true low-res images")}


def _figure(demo: Demo, step: str) -> str:
    if step not in FIGURES:
        return ""
    key, text = FIGURES[step]
    found = [r[key] for r in demo.records(step) if key in r]
    return f" (held-out {text} {found[-1]:.3f})" if found else ""


def _last_eval(records: list[dict], key: str) -> dict:
    found = [r for r in records if key in r]
    if not found:
        raise PipelineError(f"no evaluation record with {key!r} in a demo run's metrics.jsonl")
    return found[-1]


def heldout_prompts(heldout_dir: Path, limit: int) -> list[tuple[str, Image.Image, list[SceneObject]]]:
    """The first `limit` held-out samples as (caption, image, objects), read straight from the tar shards."""
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
        sums = fidelity_sums(_unit(images), objects[:len(images)])
        figures.update({f"fidelity_{k}{suffix}": hits / count for k, (hits, count) in sums.items()})
        # how many objects each figure judged: its binomial standard error is sqrt(p (1 - p) / n)
        figures.update({f"fidelity_{k}{suffix}_n": int(count) for k, (_, count) in sums.items()})
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
    figures.update(clip_space(demo, scenes, guided, plain))
    return {**figures, "checker_colour_on_real": checker["colour"], "checker_position_on_real": checker["position"],
            "prompts": len(prompts), "variations": len(variations)}


def _unit(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] (the sampler's range) -> [0, 1] on the CPU."""
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


def clip_space(demo: Demo, scenes: list, guided: torch.Tensor, plain: torch.Tensor) -> dict[str, float]:
    """Frechet distance in the demo CLIP's image-feature space to as many training images (no Inception weights
    here: never called FID) and CLIP score, for guided and unguided samples and the real held-out images (the
    floor: held-out scenes are object combinations the training images never show)."""
    side = guided.shape[-1]
    train = heldout_prompts(demo.train_dir, len(scenes))
    real = _unit(torch.stack([to_tensor(image, side) for _, image, _ in scenes]))
    reference = _unit(torch.stack([to_tensor(image, side) for _, image, _ in train]))
    prompts = [caption for caption, _, _ in scenes]
    clip = FrozenClip.load(demo.bundle / "clip", "bundle clip")
    return clip_space_figures(clip, reference, {"": (_unit(guided), prompts),
                                                "_no_guidance": (_unit(plain), prompts), "_real": (real, prompts)})


def run_demo(out: Path, size: DemoSize = FULL) -> int:
    """Run the whole pipeline on the embedded synthetic data (see the module docstring); returns the exit code.

    The training chains are spawned processes, so a script calling this needs the ``if __name__ == "__main__":``
    guard (multiprocessing's spawn start method re-imports the script)."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, size)
    _say(f"shards: {size.train_samples} train / {size.heldout_samples} held-out samples at {RESOLUTION} px "
         f"({len(TRAIN_TUPLES)} train / {len(HELDOUT_TUPLES)} held-out object combinations) in {out / 'shards'}")
    train_chains(demo)
    clip = _last_eval(demo.records("clip"), "eval/t2i_recall@1")
    ae = _last_eval(demo.records("autoencoder"), "eval/psnr")
    prior = _last_eval(demo.records("prior"), "eval/prior_cos")
    report: dict = {"clip_t2i_recall_at_1": clip["eval/t2i_recall@1"], "autoencoder_psnr": ae["eval/psnr"],
                    "autoencoder_latent_std": ae.get("eval/latent_std"), "prior_cos": prior["eval/prior_cos"],
                    "baseline_cos": prior["eval/baseline_cos"],
                    "prior_retrieval_at_1": prior.get("eval/prior_retrieval@1")}
    report["seconds_training"] = time.time() - start
    _say(f"sampling {size.prompts} held-out prompts through the bundle, guidance on and off")
    report.update(sample_heldout(demo))
    report.update(seconds=time.time() - start, seconds_per_stage=demo.seconds, bundle=str(demo.bundle.resolve()),
                  machine=describe(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_report(report, out)
    return 0


def binomial_se(p: float, n: int) -> float:
    """Standard error of a fraction p of n independent yes/no judgements."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def print_report(report: dict, out: Path) -> None:
    def pct(key: str) -> str:
        return f"{100 * report[key]:.0f}%"

    def pct_se(key: str) -> str:  # "84% +- 2": the figure and its binomial standard error, in points
        return f"{pct(key):>4} +-{100 * binomial_se(report[key], report[f'{key}_n']):2.0f}"

    _say("what the models learned (held-out data: object combinations no model saw in training):")
    _say(f"  CLIP text->image recall@1 in pools of 64: {report['clip_t2i_recall_at_1']:.3f} (chance 0.016)")
    _say(f"  autoencoder PSNR {report['autoencoder_psnr']:.1f} dB, scaled latents' std "
         f"{report['autoencoder_latent_std']:.2f}")
    _say(f"  prior: cosine to the true image embedding {report['prior_cos']:.3f} vs the text embedding's "
         f"{report['baseline_cos']:.3f}; retrieval@1 in pools of 64 {report['prior_retrieval_at_1']:.2f}")
    _say(f"  prompt fidelity of {report['prompts']} sampled images (64 px, whole cascade):")
    for attribute in ("colour", "position", "size", "shape"):
        _say(f"    {attribute:<8} guidance on {pct_se(f'fidelity_{attribute}')}   off "
             f"{pct_se(f'fidelity_{attribute}_no_guidance')}")
    _say(f"  variations of {report['variations']} held-out images (their CLIP image embedding, no text) keep their "
         f"colour in {pct_se('fidelity_colour_variations')}")
    _say("  (+-: the binomial standard error of each fraction, in points)")
    _say(f"  (the checker scores real held-out images {pct('checker_colour_on_real')} colour, "
         f"{pct('checker_position_on_real')} position)")
    _say(f"  Frechet distance in the demo CLIP's image space to training images (not an FID): guided "
         f"{report['fd_clip']:.3f}, unguided {report['fd_clip_no_guidance']:.3f}, real held-out images "
         f"{report['fd_clip_real']:.3f} (the floor)")
    _say(f"  CLIP score against the prompts: guided {report['clip_score']:.1f}, unguided "
         f"{report['clip_score_no_guidance']:.1f}, real held-out images {report['clip_score_real']:.1f}")
    chains = " | ".join(" -> ".join(f"{k} {report['seconds_per_stage'][k]:.0f} s" for k in chain) for chain in CHAINS)
    _say(f"time on {report['machine']}: {report['seconds']:.0f} s: training {report['seconds_training']:.0f} s "
         f"(side by side: {chains}), sampling {report['seconds_per_stage']['sampling']:.0f} s")
    _say(f"outputs: {out / 'samples.png'} (held-out image | guided | unguided), {out / 'report.json'}, "
         f"bundle {report['bundle']}")
    _say(f"sample it yourself: python -m pipeline sample {report['bundle']} --prompt \"a large red circle on the "
         f"left\" --out red.png --num-images 4")
