"""Throughput of the whole training reader: tar read + shuffle buffer + JPEG decode + crop/resize + uint8 batch
(B, 3, S, S) + open_clip BPE tokenization + batching, in images per second, for DataLoader worker counts 0, 1, 2.
Normalisation is not part of it: it runs on the training device (pipeline.data.spec.normalize_images).

    python benchmarks/data_loader.py                      # 256 px photo-like JPEGs, outputs at 64 and 256 px
    python benchmarks/data_loader.py --source-size 512 --samples 1000
    python benchmarks/data_loader.py --aspects 1:1,4:3,3:4,16:9,9:16 --buckets   # + bucketed vs square rows

With --aspects the source images have those shapes (about --source-size squared pixels each, cycled); with
--buckets every row is measured twice on the same shards, square crops and aspect-ratio buckets (data.buckets,
step 8), and the bucketed rate is given as a share of the square one (goal >= 90 %).

The images are 'photo-like' (multi-octave coloured noise, JPEG quality 90, ~22 KB at 256 px) rather than the
flat synthetic scenes, whose JPEGs decode unrealistically fast. Throughput is measured after a warm-up that
covers worker start-up and the shuffle-buffer fill. Workers 0 runs everything in the one main process.
Besides wall-clock images/s the table gives images per CPU-second of the main process plus its workers (read
from /proc): the per-core rate, which stays meaningful on a machine shared with other jobs.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import BucketConfig, DataConfig
from pipeline.data.loader import build_train_loader
from pipeline.data.shard_writer import ShardWriter
from pipeline.data.spec import SampleSpec
from pipeline.data.synthetic import SQUARE, canvas_size, parse_aspects


def photo_like_jpeg(size: int, rng: np.random.Generator, height: int = 0) -> bytes:
    """A textured colour image: noise at several scales summed (like natural-image 1/f spectra), JPEG q90.
    size: width in pixels; height: 0 = square."""
    width, height = size, height or size
    img = np.zeros((height, width, 3), np.float32)
    for octave, weight in ((4, 0.5), (16, 0.25), (64, 0.15), (max(width, height), 0.1)):
        layer = rng.random((octave, octave, 3), dtype=np.float32)
        up = Image.fromarray((layer * 255).astype(np.uint8), "RGB").resize((width, height), Image.BICUBIC)
        img += weight * np.asarray(up, np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: Path, samples: int, size: int, shard_size: int, aspects: tuple = SQUARE) -> float:
    """Write `samples` photo-like JPEGs with captions (shapes cycled over `aspects`); returns the mean KB."""
    rng = np.random.default_rng(0)
    words = ["red", "small", "dog", "on", "a", "beach", "house", "tree", "large", "blue", "photo", "of", "the"]
    total = 0
    with ShardWriter(out, shard_size=shard_size) as writer:
        for i in range(samples):
            width, height = canvas_size(size, aspects[i % len(aspects)])
            jpg = photo_like_jpeg(width, rng, height)
            total += len(jpg)
            caption = " ".join(rng.choice(words, size=12))
            writer.write(f"img{i:07d}", {"jpg": jpg, "txt": caption.encode()})
    return total / samples / 1024


def clip_tokenizer():
    from pipeline.compat import patch_torchvision_for_cpu_torch

    patch_torchvision_for_cpu_torch()  # open_clip imports torchvision; see pipeline/compat.py
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # BPE vocab ships inside open_clip: no download

    def tokenize(captions: list[str]):
        return {"text": tokenizer(captions)}  # int64 (B, 77)

    return tokenize


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds of this process, CPU seconds of its live children, e.g. DataLoader workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # fields[1] is the parent pid
            children += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return time.process_time(), children


def measure(urls: str, image_size: int, workers: int, batch_size: int, batches: int,
            tokenize, buckets: bool = False) -> tuple[float, float, float]:
    """-> (images/s wall clock, images per CPU-second of all loader processes, main-process CPU share)."""
    data = DataConfig(urls=urls, num_workers=workers, shuffle_buffer=256, crop="random", worker_timeout_s=600.0,
                      buckets=BucketConfig(enabled=buckets, step=8))
    spec = SampleSpec(image_size=image_size, tokenize=tokenize)
    loader = build_train_loader(data, spec, batch_size=batch_size, seed=0, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(max(4, 2 * workers)):  # warm-up: worker start, buffer fill
        next(it)
    start, (main0, kids0) = time.perf_counter(), _cpu_seconds()
    for _ in range(batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    main1, kids1 = _cpu_seconds()
    shape = tuple(batch["target_size"][0].tolist()) if buckets else (image_size, image_size)
    assert batch["image"].shape == (batch_size, 3, *shape) and batch["image"].dtype == torch.uint8
    loader.close()
    images, cpu = batches * batch_size, (main1 - main0) + (kids1 - kids0)
    return images / elapsed, images / cpu, (main1 - main0) / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--source-size", type=int, default=256)
    parser.add_argument("--sizes", default="64,256", help="output sizes, comma separated")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--aspects", default="1:1", help="source image shapes W:H, comma separated (default 1:1)")
    parser.add_argument("--buckets", action="store_true", help="also measure with aspect-ratio buckets")
    args = parser.parse_args()
    tokenize = clip_tokenizer()
    aspects = parse_aspects(args.aspects)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        kb = write_shards(Path(tmp), args.samples, args.source_size, shard_size=250, aspects=aspects)
        print(f"wrote {args.samples} {args.source_size} px JPEGs ({args.aspects}, mean {kb:.1f} KB) in "
              f"{time.perf_counter() - t0:.0f} s; cpu: {os.cpu_count()} cores, {platform.processor() or 'cpu'}")
        print("| source px | output px | workers | loader | images/s (wall) | images per CPU-second | "
              "main-process CPU | per CPU-s vs square |")
        print("|---|---|---|---|---|---|---|---|")
        for size in (int(s) for s in args.sizes.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                square = None
                for bucketed in (False, True) if args.buckets else (False,):
                    wall, per_cpu, main_share = measure(tmp, size, workers, args.batch_size, args.batches, tokenize,
                                                        bucketed)
                    square = per_cpu if square is None else square
                    print(f"| {args.source_size} | {size} | {workers} | {'buckets' if bucketed else 'square'} | "
                          f"{wall:.0f} | {per_cpu:.0f} | {100 * main_share:.0f} % | "
                          f"{100 * per_cpu / square:.0f} % |", flush=True)


if __name__ == "__main__":
    main()
