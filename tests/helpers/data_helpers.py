"""Helpers for the data-layer tests: tiny shards, a toy tokenizer, batch comparison (imported by test modules)."""
from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data.spec import SampleSpec

TOKEN_LEN = 8


def toy_tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
    """Bytes of each caption, truncated/zero-padded -> {"text": int64 (B, 8)}."""
    out = torch.zeros(len(captions), TOKEN_LEN, dtype=torch.int64)
    for i, caption in enumerate(captions):
        codes = list(caption.encode("utf-8"))[:TOKEN_LEN]
        out[i, : len(codes)] = torch.tensor(codes, dtype=torch.int64)
    return {"text": out}


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    """A smooth random colour image (JPEG, quality 90), different per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> Path:
    """Write samples ``(key, {ext: bytes})`` as a tar shard (members ``KEY.EXT``)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_sample(index: int, width: int = 20, height: int = 14) -> tuple[str, dict[str, bytes]]:
    return f"s{index:05d}", {"jpg": jpeg_bytes(width, height, index), "txt": f"caption {index}".encode()}


ALL_RECT_KEYS = {f"s{i:05d}" for i in range(50)}


def data_config(urls, **overrides) -> DataConfig:
    if isinstance(urls, (list, tuple)):
        urls = tuple(str(u) for u in urls)
    base = dict(urls=str(urls) if isinstance(urls, Path) else urls, num_workers=0, shuffle_buffer=0, resolution=12,
                skip_check_min_samples=1000, worker_timeout_s=60.0)
    base.update(overrides)
    return DataConfig(**base)


SPEC = SampleSpec(image_size=12, tokenize=toy_tokenize)


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    """Bitwise equality of every tensor field and equality of every list field."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            if isinstance(x[name], torch.Tensor):
                assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name
            else:
                assert x[name] == y[name], name


def roundtrip(state: dict) -> dict:
    """What a checkpoint does: torch.save, then torch.load with weights_only=True (plain types only)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_resume(make: Callable, consumed: int, following: int) -> list[dict]:
    """Reference run vs. consume -> state_dict -> checkpoint round trip -> fresh loader -> load_state_dict:
    the `following` batches must be bitwise equal. `make()` builds a fresh training loader; returns the reference
    batches."""
    reference = make()
    ref_batches = take(iter(reference), consumed + following)
    reference.close()

    first = make()
    take(iter(first), consumed)
    state = roundtrip(first.state_dict())
    first.close()

    resumed = make()
    resumed.load_state_dict(state)
    got = take(iter(resumed), following)
    resumed.close()
    assert_same_batches(got, ref_batches[consumed:])
    return ref_batches
