"""Flow matching vs v-prediction, DiT vs U-Net, on the demo's 16 px base stage: held-out prompt fidelity with
guidance, per number of sampling steps, after the same number of training steps (wall time printed per run).

    python benchmarks/objective_backbone.py OUT [--steps 400] [--prompts 64] [--runs unet_vp unet_flow dit_flow]

Trains (resuming) three base stages on the demo's synthetic shards (written under OUT/shards if missing):
``unet_vp`` = configs/demo/unet_base.yaml as shipped (cosine schedule, v target, min-SNR, dpmpp_2m);
``unet_flow`` = the same U-Net with objective flow (logit-normal, uniform weight, flow_euler);
``dit_flow`` = configs/demo/dit_flow.yaml. Each is exported into its own bundle and samples the first
`--prompts` held-out captions at 5 / 10 / 20 / 40 steps, guidance 3, scored by pipeline/eval/fidelity.py; the
untrained floor is the same checker on an untrained network's samples (step 0, not trained).
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.demo import DemoSize, heldout_prompts, make_demo_shards  # noqa: E402
from pipeline.eval.fidelity import fidelity_sums  # noqa: E402
from pipeline.export import export_run  # noqa: E402
from pipeline.machine import describe  # noqa: E402
from pipeline.sampling.text2image import Text2Image  # noqa: E402
from pipeline.train.entry import local_process_group, run_training  # noqa: E402

FLOW_UNET = ("model.diffusion.objective=flow", "model.diffusion.loss_weighting=uniform",
             "model.sampling.sampler.name=flow_euler")
RUNS = {"unet_vp": ("unet_base", ()), "unet_flow": ("unet_base", FLOW_UNET), "dit_flow": ("dit_flow", ())}
SAMPLE_STEPS = (5, 10, 20, 40)


def train(out: Path, name: str, steps: int, train_dir: Path, heldout_dir: Path) -> tuple[Path, float, int]:
    """Train run `name` for `steps` steps and export it; returns (bundle, seconds, parameters)."""
    config, extra = RUNS[name]
    cfg = load_config(REPO / "configs" / "demo" / f"{config}.yaml",
                      [f"data.urls={train_dir}", f"data.eval_urls={heldout_dir}", f"train.max_steps={steps}",
                       "eval.every_steps=0", "train.sample_every=0", f"ckpt.every_steps={steps}",
                       f"optim.warmup_steps={min(100, steps // 5)}", *extra])
    run = out / "runs" / name
    start = time.time()
    if run_training(cfg, run) != 0:  # inside main's one local_process_group
        raise SystemExit(f"{name}: training failed")
    seconds = time.time() - start
    bundle = out / "bundles" / name
    if not bundle.exists():
        export_run(run, bundle)
    t2i = Text2Image.from_bundle(bundle)
    params = sum(p.numel() for p in t2i.levels[0].unet.parameters())
    return bundle, seconds, params


def fidelity(bundle: Path, scenes: list, steps: int) -> dict[str, float]:
    t2i = Text2Image.from_bundle(bundle)
    prompts = [caption for caption, _, _ in scenes]
    images = torch.cat([t2i.generate(prompts[i:i + 32], seed=0, steps=steps, guidance=3.0)
                        for i in range(0, len(prompts), 32)])
    sums = fidelity_sums(((images.float() + 1) / 2).clamp(0, 1), [objects for _, _, objects in scenes])
    return {k: hits / count for k, (hits, count) in sums.items()}


def row(out: Path, name: str, steps: int, train_dir: Path, heldout_dir: Path, scenes: list) -> None:
    """Train, export and score one run; prints its table row."""
    bundle, seconds, params = train(out, name, steps, train_dir, heldout_dir)
    cells = []
    for sample_steps in SAMPLE_STEPS:
        found = fidelity(bundle, scenes, sample_steps)
        cells.append(f"{found['colour']:.2f} / {found['position']:.2f}")
    print(f"| {name} | {params / 1e6:.2f} M | {seconds:.0f} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--train-samples", type=int, default=4096, help="synthetic training scenes to write")
    args = parser.parse_args(argv)
    train_dir, heldout_dir = make_demo_shards(args.out, DemoSize(train_samples=args.train_samples, heldout_samples=256))
    scenes = heldout_prompts(heldout_dir, args.prompts)
    print(f"# objective x backbone, {args.steps} training steps (batch 32, 16 px), {len(scenes)} held-out prompts, "
          f"guidance 3; {describe()}, torch {torch.__version__}, {datetime.date.today().isoformat()}", flush=True)
    print("| run | params | train s | " + " | ".join(f"colour/position @{s}" for s in SAMPLE_STEPS) + " |")
    print("|---|---|---|" + "---|" * len(SAMPLE_STEPS), flush=True)
    with local_process_group():
        for name in args.runs:
            row(args.out, name, args.steps, train_dir, heldout_dir, scenes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
