"""``python -m pipeline sample BUNDLE_DIR --prompt TEXT --out FILE.png [...]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "sample", parents=[common], help="generate images from a prompt with an exported bundle",
        description="Prompt -> T5 (and CLIP text -> prior) -> base U-Net -> super-resolution stages -> "
                    "autoencoder decode -> PNG, with classifier-free guidance and dynamic thresholding. Settings "
                    "not given use each stage's defaults stored in the bundle.")
    parser.add_argument("bundle", type=Path, help="bundle directory written by `python -m pipeline export`")
    parser.add_argument("--prompt", default=None,
                        help="text prompt (required unless --image is given alone: variations of that image)")
    parser.add_argument("--out", required=True, type=Path, help="output PNG (a grid when --num-images > 1)")
    parser.add_argument("--out-dir", type=Path, default=None, help="also write one PNG per image into this folder")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate (default 1)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale >= 1 for every stage (default: each stage's own)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per stage (default: each stage's)")
    parser.add_argument("--sampler", default=None,
                        help="sampler for every stage: ddpm, ddim, dpmpp_2m, euler, heun (vp stages), flow_euler, "
                             "flow_heun (flow stages) (the names of "
                             "pipeline.diffusion.samplers.SAMPLER_KINDS; default: each stage's)")
    parser.add_argument("--height", type=int, default=None,
                        help="output height in pixels (default: the last stage's resolution); with --width any shape "
                             "every stage was trained on (its buckets), else one line names the nearest")
    parser.add_argument("--width", type=int, default=None, help="output width in pixels (see --height)")
    parser.add_argument("--original-size", type=_pair, default=None, metavar="H,W",
                        help="size conditioning of stages trained with it (SDXL): the original image size to ask "
                             "for, in pixels (default: the output size, i.e. 'a whole, uncropped image')")
    parser.add_argument("--crop-top-left", type=_pair, default=(0, 0), metavar="TOP,LEFT",
                        help="size conditioning: the crop offset to ask for, in output pixels (default 0,0: "
                             "uncropped)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; image i of a seed is the same whatever "
                                                            "--num-images is (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--image", type=Path, default=None,
                        help="variations of this image: its CLIP image embedding replaces the prior's (bundles with "
                             "an unCLIP stage); without --prompt the text is left out entirely (DALL-E 2 variations)")
    parser.add_argument("--init-image", type=Path, default=None, help="image-to-image (SDEdit) from this image")
    parser.add_argument("--strength", type=float, default=0.6,
                        help="with --init-image: how much of the sampling is redone, in (0, 1] (default 0.6)")
    parser.set_defaults(handler=_run)


def _pair(text: str) -> tuple[int, int]:
    """'768,1024' -> (768, 1024): two whole numbers >= 0 (argparse reports the error in one line)."""
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected two whole numbers H,W (e.g. 768,1024), got {text!r}")
    return int(parts[0]), int(parts[1])


def _progress():
    from tqdm import tqdm

    bar = tqdm(desc="sample", unit="step", leave=False, disable=not sys.stderr.isatty())

    def update(done: int, total: int) -> None:
        if bar.total != total or done == 1:
            bar.reset(total=total)
        bar.update(done - bar.n)

    return update


def _run(args: argparse.Namespace) -> int:
    from pipeline.sampling.text2image import sample_to_file  # start-up time: imported when it runs (cli/main.py)

    written = sample_to_file(args.bundle, args.prompt, args.out, num_images=args.num_images, guidance=args.guidance,
                             steps=args.steps, sampler=args.sampler, seed=args.seed, device=args.device,
                             out_dir=args.out_dir, image=args.image, init_image=args.init_image,
                             strength=args.strength, progress=_progress(), height=args.height,
                             width=args.width, original_size=args.original_size,
                             crop_top_left=args.crop_top_left)
    print(f"wrote {written[0]}" + (f" and {len(written) - 1} images in {args.out_dir}" if len(written) > 1 else ""))
    return 0
