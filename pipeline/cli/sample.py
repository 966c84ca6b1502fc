"""``python -m pipeline sample BUNDLE_DIR --prompt TEXT --out FILE.png [...]``."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "sample", parents=[common], help="generate images from a prompt with an exported bundle",
        description="Prompt -> T5 (and CLIP text -> prior) -> base U-Net -> super-resolution stages -> "
                    "autoencoder decode -> PNG, with classifier-free guidance and dynamic thresholding.")
    parser.add_argument("bundle", type=Path, help="bundle directory written by `python -m pipeline export`")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--out", required=True, type=Path, help="output PNG (a grid when --num-images > 1)")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps per stage (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.sample import sample_to_file

    sample_to_file(args.bundle, args.prompt, args.out, num_images=args.num_images, guidance=args.guidance,
                   steps=args.steps, seed=args.seed)
    return 0
