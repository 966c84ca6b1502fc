"""``python -m pipeline shards ...``: build WebDataset tar shards, and precompute frozen-encoder arrays aligned
with them (``shards precompute``, see pipeline/precompute/run.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.data.from_folder import pack_folder
from pipeline.data.synthetic import parse_aspects, write_synthetic_shards
from pipeline.errors import UsageError
from pipeline.precompute.encoders import ENCODERS
from pipeline.precompute.run import PrecomputeJob, finalize, run_precompute


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser("shards", parents=[common], help="build WebDataset tar shards",
                            description="Build WebDataset tar shards (KEY.jpg/png + KEY.txt + KEY.json) "
                                        "and a shards.json index, or precompute frozen-encoder arrays for them.")
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
    syn.add_argument("--aspect-ratios", default="1:1", metavar="W:H,...",
                     help="canvas shapes, cycled over the samples, each of about --resolution squared pixels; "
                          "positions keep their meaning in every shape, e.g. 1:1,4:3,3:4,16:9,9:16 (default 1:1)")
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
    folder.add_argument("--max-side", type=int, default=0,
                        help="shrink images whose long side is larger to this many pixels (never enlarges); "
                             "0 = store every image's original bytes (default 0)")
    folder.set_defaults(handler=_run_from_folder)
    _add_precompute(kinds, common)


def _add_precompute(kinds: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    pre = kinds.add_parser(
        "precompute", parents=[common], help="store frozen-encoder outputs per sample, aligned with source shards",
        description="Run frozen encoders (T5, CLIP text/image) over every sample of the source shards and write "
                    "one shard per source shard (same file name, same keys in the same order) holding "
                    "KEY.<array>.npy members, plus shards.json. Point data.precomputed_urls at OUT.")
    pre.add_argument("src", metavar="SRC", nargs="*",
                     help="source shards, local: directories, brace patterns or files (as data.urls; several "
                          "make a list); not needed with --finalize")
    pre.add_argument("--out", required=True, help="output directory (shared by all parts)")
    pre.add_argument("--encoder", action="append", default=[], metavar="SPEC",
                     help=f"NAME:ARG, repeatable; NAME one of {', '.join(sorted(ENCODERS))}. E.g. t5:PATH[:MAXLEN] "
                          "-> t5_emb float16 (L, D) + t5_mask bool (L,); clip-text:CLIP_DIR -> clip_text_emb float32 "
                          "(E,); clip-image:CLIP_DIR -> clip_image_emb float32 (E,) (CLIP_DIR: an exported open_clip "
                          "folder)")
    pre.add_argument("--batch-size", type=int, default=64, help="samples per encoder call (default 64)")
    pre.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where encoders run (default cpu)")
    pre.add_argument("--caption-key", default="txt", help="'txt' or 'json:FIELD', as data.caption_key")
    pre.add_argument("--num-parts", type=int, default=1, help="split the source shards over P runs (default 1)")
    pre.add_argument("--part", type=int, default=0, help="which part this run does, 0..P-1 (default 0)")
    pre.add_argument("--buckets-config", default="", metavar="RUN.yaml",
                     help="latents per aspect-ratio bucket: each image placed in its bucket of this run config's "
                          "data.buckets at data.resolution and centre-cropped exactly as that run's training loader "
                          "does; the run then trains on them with data.buckets and data.crop: center")
    pre.add_argument("--finalize", action="store_true",
                     help="only merge the finished parts' shards.part-I.json files in OUT into shards.json")
    pre.set_defaults(handler=_run_precompute)


def _run_synthetic(args: argparse.Namespace) -> int:
    if args.num_samples <= 0 or args.shard_size <= 0:
        raise UsageError("--num-samples and --shard-size must be positive")
    if args.resolution < 8:
        raise UsageError("--resolution must be at least 8 pixels")
    try:
        aspects = parse_aspects(args.aspect_ratios)
    except ValueError as exc:
        raise UsageError(f"--aspect-ratios: {exc}") from None
    index = write_synthetic_shards(args.out, args.num_samples, args.shard_size, args.resolution, args.seed,
                                   args.split, args.image_format, aspects)
    print(f"wrote {index['num_samples']} {args.split} samples in {index['num_shards']} shards to {args.out}")
    return 0


def _run_precompute(args: argparse.Namespace) -> int:
    if args.finalize:
        index = finalize(Path(args.out))
        print(f"wrote {args.out}/shards.json: {index['num_samples']} samples in {index['num_shards']} shards "
              f"from {index['num_parts']} part(s)")
        return 0
    if not args.src or not args.encoder:
        raise UsageError("precompute needs SRC and at least one --encoder NAME:ARG (or --finalize --out DIR)")
    job = PrecomputeJob(tuple(args.src), Path(args.out), tuple(args.encoder), args.batch_size, args.device,
                        args.num_parts, args.part, args.caption_key, args.buckets_config)
    result = run_precompute(job)
    part = f" (part {args.part} of {args.num_parts})" if args.num_parts > 1 else ""
    print(f"precomputed {result.samples} samples in {result.written} shards{part} to {args.out}"
          + (f"; {result.reused} shards were already done" if result.reused else ""))
    if result.skipped:
        print("samples without some arrays (KEY.skip): " + ", ".join(f"{r}={n}" for r, n in
                                                                       sorted(result.skipped.items())))
    if result.index is not None:
        arrays = ", ".join(f"{n} {a['dtype']} {tuple(a['shape'])}" for n, a in result.index["arrays"].items())
        print(f"wrote {args.out}/shards.json: {result.index['num_samples']} samples in "
              f"{result.index['num_shards']} shards; arrays: {arrays}")
    else:
        print(f"waiting for part(s) {list(result.pending_parts)}; shards.json is written when the last one finishes "
              f"(or run: python -m pipeline shards precompute --finalize --out {args.out})")
    return 0


def _run_from_folder(args: argparse.Namespace) -> int:
    index = pack_folder(args.src, args.out, args.shard_size, args.max_shard_bytes, args.max_side)
    print(f"wrote {index['num_samples']} samples in {index['num_shards']} shards to {args.out}"
          + (f" ({index['shrunk']} shrunk to --max-side {args.max_side})" if index.get("shrunk") else ""))
    skipped = index.get("skipped", {})
    if skipped:
        total = sum(skipped.values())
        print(f"skipped {total} files/samples: " + ", ".join(f"{r}={n}" for r, n in skipped.items()))
    else:
        print("skipped nothing")
    return 0
