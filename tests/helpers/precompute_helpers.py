"""Helpers for the precomputed-conditioning tests: tiny frozen encoders, a source with bad samples, shard reading."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cli.main import main
from pipeline.config import Config, DataConfig
from pipeline.data.precomputed_index import read_npy
from pipeline.data.shard_writer import ShardWriter
from pipeline.data.synthetic import COLOURS, POSITION_PHRASES, SHAPES, SIZES, make_sample
from pipeline.data.tar_reader import iter_shard
from pipeline.models.clip import ClipConfig, ClipTextConfig, ClipVisionConfig, build_clip
from pipeline.train.stage import StageContext
from pipeline.stages.clip import ClipStage
from pipeline.text.t5 import write_tiny_t5

T5_MAXLEN = 12
CLIP_CONFIG = ClipConfig(embed_dim=16, vision=ClipVisionConfig(image_size=16, patch_size=8, width=32, layers=1,
                                                               head_width=16),
                         text=ClipTextConfig(context_length=16, width=32, heads=2, layers=1))
WORDS = [*SIZES, *COLOURS, *SHAPES, *" ".join(POSITION_PHRASES.values()).split(), "a", "and", "shape"]
ALL_ARRAYS = ("t5_emb", "t5_mask", "clip_text_emb", "clip_image_emb")
BAD_IMAGE_KEY, NO_CAPTION_KEY = "bad_image", "no_caption"


@dataclass
class Setup:
    """Source shards (3 x 9 samples, shard 1 holds one corrupt image and one sample without caption), the tiny
    encoders and the precompute of all four arrays over the source."""

    src: Path
    pre: Path
    t5: Path
    clip: Path
    clip_model: torch.nn.Module


def write_source(out: Path) -> Path:
    """27 samples of 16 px synthetic scenes in 3 shards + shards.json; samples 10 and 11 are bad."""
    with ShardWriter(out, shard_size=9) as writer:
        for i in range(27):
            key, members = make_sample(i, 0, "train", 16, "jpg")
            if i == 10:
                key, members = BAD_IMAGE_KEY, {"jpg": b"\xff\xd8 not a jpeg", "txt": members["txt"]}
            elif i == 11:
                key, members = NO_CAPTION_KEY, {"jpg": members["jpg"]}
            writer.write(key, members)
    return out


def export_tiny_clip(out: Path) -> torch.nn.Module:
    """A tiny random CLIP written as an open_clip local-dir folder by the clip stage's own export."""
    torch.manual_seed(0)
    model = build_clip(CLIP_CONFIG).eval()
    stage = ClipStage(Config(stage="clip", model=CLIP_CONFIG, data=DataConfig(resolution=16)),
                      StageContext(0, 1, torch.device("cpu"), torch.float32))
    stage.export({"model": model}, out)
    return model


def encoder_args(setup: Setup, arrays: tuple[str, ...] = ALL_ARRAYS) -> list[str]:
    args = []
    if "t5_emb" in arrays:
        args += ["--encoder", f"t5:{setup.t5}:{T5_MAXLEN}"]
    if "clip_text_emb" in arrays:
        args += ["--encoder", f"clip-text:{setup.clip}"]
    if "clip_image_emb" in arrays:
        args += ["--encoder", f"clip-image:{setup.clip}"]
    return args


def precompute(setup: Setup, src: Path, out: Path, *extra: str, arrays: tuple[str, ...] = ALL_ARRAYS) -> int:
    return main(["shards", "precompute", str(src), "--out", str(out), "--batch-size", "4",
                 *encoder_args(setup, arrays), *extra])


def build_setup(root: Path) -> Setup:
    t5 = write_tiny_t5(root / "t5", WORDS)
    clip_model = export_tiny_clip(root / "clip")
    setup = Setup(write_source(root / "src"), root / "pre", t5, root / "clip", clip_model)
    assert precompute(setup, setup.src, setup.pre) == 0
    return setup


def copy_setup(setup: Setup, dest: Path) -> tuple[Path, Path]:
    """Copies of the source and precomputed directories, to damage in one test."""
    shutil.copytree(setup.src, dest / "src")
    shutil.copytree(setup.pre, dest / "pre")
    return dest / "src", dest / "pre"


def read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, members) of every sample in a shard, in order."""
    return [(key, members) for _, key, members in iter_shard(str(path), lambda r, d: None)]


def stored_arrays(pre: Path) -> dict[str, dict[str, np.ndarray]]:
    """key -> {array name: array} for every sample of every precomputed shard in `pre`."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for shard in sorted(pre.glob("*.tar")):
        for key, members in read_shard(shard):
            out[key] = {ext[:-4]: read_npy(data) for ext, data in members.items() if ext.endswith(".npy")}
    return out
