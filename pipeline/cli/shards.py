"""``python -m pipeline shards ...``: build WebDataset tar shards."""
from __future__ import annotations

import argparse

from pipeline.errors import UsageError


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("shards", parents=[common], help="build WebDataset tar shards",
                            description="Build WebDataset tar shards (KEY.jpg/png + KEY.txt + KEY.json) "
                                        "and a shards.json index.")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    syn = kinds.add_parser("synthetic", parents=[common], help="procedurally drawn, exactly captioned scenes",
                           description="Draw scenes of one or two coloured shapes with captions that say exactly "
                                       "what is drawn. The heldout split only contains attribute combinations "
                                       "that the train split never shows.")
    syn.add_argument("--out", required=True, help="output directory for the shards and shards.json")
    syn.add_argument("--num-samples", type=int, required=True, help="number of samples to draw")
    syn.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default 1000)")
    syn.add_argument("--resolution", type=int, default=64, help="image side length in pixels (default 64)")
    syn.add_argument("--seed", type=int, default=0, help="random seed; same seed, same content (default 0)")
    syn.add_argument("--split", choices=("train", "heldout"), default="train",
                     help="which split to draw (default train)")
    syn.add_argument("--format", choices=("jpg", "png"), default="jpg", dest="image_format",
                     help="image encoding (default jpg)")
    syn.set_defaults(handler=_run_synthetic)
    folder = kinds.add_parser(
        "from-folder", parents=[common], help="pack an img2dataset-style folder (KEY.jpg + KEY.txt [+ KEY.json])",
        description="Pack image + caption files (KEY.jpg|jpeg|png|webp, KEY.txt, optional KEY.json; nested folders "
                    "allowed) into tar shards. Unusable files are skipped and counted by reason.")
    folder.add_argument("src", metavar="SRC", help="folder to read (searched recursively)")
    folder.add_argument("--out", required=True, help="output directory for the shards and shards.json")
    folder.add_argument("--shard-size", type=int, default=1000, help="maximum samples per shard (default 1000)")
    folder.add_argument("--max-shard-bytes", type=int, default=0,
                        help="maximum payload bytes per shard; 0 = no limit (default 0)")
    folder.set_defaults(handler=_run_from_folder)


def _run_synthetic(args: argparse.Namespace) -> int:
    from pipeline.data.synthetic import write_synthetic_shards

    if args.num_samples <= 0 or args.shard_size <= 0:
        raise UsageError("--num-samples and --shard-size must be positive")
    if args.resolution < 8:
        raise UsageError("--resolution must be at least 8 pixels")
    index = write_synthetic_shards(args.out, args.num_samples, args.shard_size, args.resolution, args.seed,
                                   args.split, args.image_format)
    print(f"wrote {index['num_samples']} {args.split} samples in {index['num_shards']} shards to {args.out}")
    return 0


def _run_from_folder(args: argparse.Namespace) -> int:
    from pipeline.data.from_folder import pack_folder

    index = pack_folder(args.src, args.out, args.shard_size, args.max_shard_bytes)
    print(f"wrote {index['num_samples']} samples in {index['num_shards']} shards to {args.out}")
    skipped = index.get("skipped", {})
    if skipped:
        total = sum(skipped.values())
        print(f"skipped {total} files/samples: " + ", ".join(f"{r}={n}" for r, n in skipped.items()))
    else:
        print("skipped nothing")
    return 0
