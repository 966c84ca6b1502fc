"""``python -m pipeline shards precompute``: run frozen encoders over source shards once, store per-sample arrays.

Output (format: precomputed_index.py): one shard per source shard, same file name, same keys in the same order,
members ``KEY.<array>.npy``; samples an encoder cannot encode keep their place with a ``KEY.skip`` marker.

Parts. ``--num-parts P --part I`` processes the source shards with index ``i % P == I`` (source order), so P
machines writing into one shared --out share the work without coordinating. Part I records its progress in
``shards.part-I.json`` after every finished shard (so a restarted part skips what it already wrote); whichever
part finishes last and sees every part complete writes ``shards.json``. With separate output directories, copy
them together and run ``precompute --finalize --out DIR``; the reader also merges complete part files itself.
Every part must be run with the same SRC, --encoder list, --caption-key and --num-parts (checked at merge).

Images are decoded exactly as the reader decodes evaluation images (short side resized, center crop, no size or
aspect filters) at each encoder's image size and normalised with its mean/std (spec.normalize_images). With
``--buckets-config RUN.yaml``, per-bucket encoders (latents) get each image placed in its bucket and centre-cropped
by the training loader's own options for that config (loader.bucket_options: its data.buckets, data.resolution,
min_image_size and max_aspect_ratio), encoded one bucket shape per call.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data.loader import bucket_options
from pipeline.data.precomputed_index import (DIGEST_MEMBER, INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, SHARED_FIELDS,
                                             SKIP_MEMBER, array_member, load_index, merge_parts, npy_bytes,
                                             part_index_name, read_parts, shard_name, source_counts, source_digest,
                                             write_json_atomic)
from pipeline.data.shard_writer import TarShard
from pipeline.data.sources import expand_shard_specs, local_path
from pipeline.data.spec import normalize_images
from pipeline.data.tar_reader import iter_shard
from pipeline.data.transforms import (Crop, ImageOptions, SkipSample, decode_with_crop, image_batch, image_bytes,
                                      read_caption)
from pipeline.errors import DataError, UsageError
from pipeline.precompute.encoders import Encoder, EncoderContext, build_encoders

logger = logging.getLogger(__name__)
Sample = tuple[str, dict[str, bytes]]


@dataclass(frozen=True)
class PrecomputeJob:
    """One part of one precompute run.

    src: source shard spec(s) (directory, brace pattern, list; local files). out: output directory.
    encoders: ``NAME:ARG`` specs (see encoders.ENCODERS). batch_size: samples per encoder call.
    device: "cpu" or "cuda". num_parts, part: this run does source shards i with i % num_parts == part.
    caption_key: where captions come from, as data.caption_key ('txt' or 'json:FIELD').
    buckets_config: a run config whose data.buckets / resolution per-bucket encoders (latents) follow; "" = none.
    """

    src: str | tuple[str, ...]
    out: Path
    encoders: tuple[str, ...]
    batch_size: int = 64
    device: str = "cpu"
    num_parts: int = 1
    part: int = 0
    caption_key: str = "txt"
    buckets_config: str = ""


@dataclass(frozen=True)
class PrecomputeResult:
    """What one part did: shards written now / found done, samples written, skip markers by reason, and the merged
    index when this part completed the run (else the parts still running)."""

    written: int
    reused: int
    samples: int
    skipped: dict[str, int]
    index: dict | None
    pending_parts: tuple[int, ...]


def _check_job(job: PrecomputeJob) -> None:
    if not job.encoders:
        raise UsageError("precompute needs at least one --encoder NAME:ARG")
    if job.batch_size <= 0:
        raise UsageError(f"--batch-size must be > 0, got {job.batch_size}")
    if job.num_parts <= 0 or not 0 <= job.part < job.num_parts:
        raise UsageError(f"--part must be in 0..{job.num_parts - 1} for --num-parts {job.num_parts}, got {job.part}")
    if job.caption_key != "txt" and not (job.caption_key.startswith("json:") and len(job.caption_key) > 5):
        raise UsageError(f"--caption-key must be 'txt' or 'json:FIELD', got {job.caption_key!r}")
    if job.device not in ("cpu", "cuda") or (job.device == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"--device {job.device!r}: use cpu, or cuda on a machine with a GPU")


def _source_files(urls: list[str]) -> list[dict[str, Any]]:
    """[{name, num_bytes}] of the source shards; they must be local, existing and uniquely named."""
    files: list[dict[str, Any]] = []
    seen: set[str] = set()
    for url in urls:
        path = local_path(url)
        if path is None or not Path(path).is_file():
            raise DataError(f"source shard {url} is not a local file: precompute fingerprints its sources by name "
                            f"and byte size, so SRC must name existing local shards")
        name = shard_name(url)
        if name in seen:
            raise DataError(f"two source shards are named {name!r}: outputs keep the source file names, so they "
                            f"must be unique")
        seen.add(name)
        files.append({"name": name, "num_bytes": Path(path).stat().st_size})
    return files


def _header(job: PrecomputeJob, files: list[dict], encoders: list[Encoder]) -> dict[str, Any]:
    arrays = {name: {"dtype": a.dtype, "shape": list(a.shape), "encoder": e.name,
                     **({"buckets": [list(b) for b in a.buckets]} if a.buckets else {})}
              for e in encoders for name, a in e.arrays().items()}
    described = [{"spec": spec, **e.describe()} for spec, e in zip(job.encoders, encoders)]
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "part": job.part, "num_parts": job.num_parts,
            "source_files": files, "arrays": arrays, "encoders": described, "caption_key": job.caption_key}


def _reusable(out: Path, header: dict) -> dict[str, dict]:
    """Entries of this part's earlier run whose shard is still there; DataError if OUT holds another run."""
    if (out / INDEX_NAME).is_file():
        old = load_index(out)  # DataError if it is not a precompute index (e.g. --out is some other dataset)
        source = [{"name": s["name"], "num_bytes": s["num_bytes"]} for s in old.get("source", [])]
        if (old.get("arrays"), old.get("encoders"), old.get("caption_key"), source) != \
                (header["arrays"], header["encoders"], header["caption_key"], header["source_files"]):
            raise DataError(f"{out} already holds a precompute with other sources, encoders or caption key "
                            f"(its {INDEX_NAME}); write to a new --out directory")
    earlier = read_parts(out).get(header["part"])
    if earlier is None:
        return {}
    differs = [f for f in SHARED_FIELDS if earlier.get(f) != header[f]]
    if differs:
        raise DataError(f"{out}/{part_index_name(header['part'])} was written with other {', '.join(differs)}; "
                        f"write to a new --out directory (or delete the old output)")
    return {e["url"]: e for e in earlier["shards"]
            if (out / e["url"]).is_file() and (out / e["url"]).stat().st_size == e["num_bytes"]}


def run_precompute(job: PrecomputeJob) -> PrecomputeResult:
    """Compute this part's shards (skipping ones an earlier run of it finished) and merge when all parts are done.

    Raises:
        UsageError: bad arguments or encoder specs. ConfigError: a model path that does not load.
        DataError: a source shard is not local, unreadable, truncated or disagrees with its shards.json; OUT
            holds a precompute with other settings.
    """
    _check_job(job)
    urls = expand_shard_specs(job.src, "SRC")
    files = _source_files(urls)
    if any(Path(local_path(u) or u).parent.resolve() == Path(job.out).resolve() for u in urls):
        raise UsageError(f"--out {job.out} holds source shards: outputs keep the source file names and would "
                         f"overwrite them; choose another directory")
    counts = source_counts(urls)
    buckets = bucket_options(load_config(job.buckets_config).data) if job.buckets_config else None
    ctx = EncoderContext(torch.device(job.device), buckets=buckets)
    with torch.inference_mode():
        encoders = build_encoders(job.encoders, ctx)
        header = _header(job, files, encoders)
        out = Path(job.out)
        out.mkdir(parents=True, exist_ok=True)
        done = _reusable(out, header)
        reused = len(done)
        mine = [(url, f) for i, (url, f) in enumerate(zip(urls, files)) if i % job.num_parts == job.part]
        written = samples = 0
        skipped: dict[str, int] = {}
        for url, file in mine:
            if file["name"] in done:
                continue
            entry = _precompute_shard(url, out / file["name"], encoders, job, counts.get(file["name"]))
            done[file["name"]] = {**entry, "source_bytes": file["num_bytes"]}
            written, samples = written + 1, samples + entry["num_samples"]
            for reason, n in entry["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
            _write_part(out, header, done, mine, complete=False)
            logger.info("precompute: wrote %s (%d samples)", out / file["name"], entry["num_samples"])
    _write_part(out, header, done, mine, complete=True)
    index, pending = _try_merge(out, job.num_parts)
    return PrecomputeResult(written, reused, samples, skipped, index, pending)


def _write_part(out: Path, header: dict, done: dict[str, dict], mine: list, complete: bool) -> None:
    entries = [done[f["name"]] for _, f in mine if f["name"] in done]
    write_json_atomic(out / part_index_name(header["part"]), {**header, "complete": complete, "shards": entries},
                      tag=f"-{header['part']}")


def _try_merge(out: Path, num_parts: int) -> tuple[dict | None, tuple[int, ...]]:
    parts = read_parts(out)
    pending = tuple(p for p in range(num_parts) if not parts.get(p, {}).get("complete"))
    if pending:
        return None, pending
    return finalize(out), ()


def finalize(out: Path) -> dict:
    """Merge every part's progress file into ``OUT/shards.json`` (atomic); returns the index.

    Raises:
        DataError: a part is missing or unfinished, or the parts were run with different settings.
    """
    index = merge_parts(Path(out))
    write_json_atomic(Path(out) / INDEX_NAME, index, tag="-merge")
    return index


def _precompute_shard(url: str, path: Path, encoders: list[Encoder], job: PrecomputeJob,
                      expected: int | None) -> dict[str, Any]:
    """Write the precomputed shard of one source shard; returns its shards.json entry."""
    problems: list[str] = []
    skipped: dict[str, int] = {}
    shard = TarShard(path)
    try:
        batch: list[Sample] = []
        for _, key, members in iter_shard(url, lambda reason, detail: problems.append(f"{reason}: {detail}")):
            batch.append((key, members))
            if len(batch) == job.batch_size:
                _write_batch(shard, batch, encoders, job, skipped)
                batch = []
        if batch:
            _write_batch(shard, batch, encoders, job, skipped)
        if problems:
            raise DataError(f"source shard {url} cannot be read completely ({problems[0]}); a precomputed shard "
                            f"mirrors a whole source shard: repair the shard or leave it out of SRC")
        if expected is not None and expected != shard.num_samples:
            raise DataError(f"source shard {url} holds {shard.num_samples} samples but its shards.json says "
                            f"{expected}; fix or regenerate the source index")
    except BaseException:
        shard.abort()
        raise
    info = shard.close()
    return {"url": info.url, "num_samples": info.num_samples, "num_bytes": info.num_bytes, "skipped": skipped}


def _write_batch(shard: TarShard, batch: list[Sample], encoders: list[Encoder], job: PrecomputeJob,
                 skipped: dict[str, int]) -> None:
    for (key, _), members in zip(batch, encode_samples(batch, encoders, job.caption_key, torch.device(job.device))):
        if SKIP_MEMBER in members:
            reason = json.loads(members[SKIP_MEMBER])["reason"]
            skipped[reason] = skipped.get(reason, 0) + 1
        shard.write(key, members)


def _attempt(fn, *args):
    """fn(*args), or the SkipSample it raised (the reader's reason for not using the sample)."""
    try:
        return fn(*args)
    except SkipSample as skip:
        return skip


def _decode(members: dict[str, bytes], opts: ImageOptions) -> tuple[np.ndarray, Crop]:
    return decode_with_crop(image_bytes(members), opts, 0)  # crop seed unused: centre crops


def _options(encoder: Encoder) -> ImageOptions | None:
    """How an encoder's images are decoded: its per-bucket options, else the square centre crop; None: no image."""
    size = encoder.input.image_size
    return getattr(encoder, "options", None) or (ImageOptions(size, random_crop=False) if size else None)


def encode_samples(samples: list[Sample], encoders: list[Encoder], caption_key: str,
                   device: torch.device) -> list[dict[str, bytes]]:
    """Per sample, the precomputed shard's members: ``{array}.npy`` bytes for every array that could be computed,
    ``source_crc32`` (the source sample's digest), plus ``skip`` (JSON reason, detail, missing arrays) when some
    arrays could not be computed."""
    captions = [_attempt(read_caption, members, caption_key) for _, members in samples]
    images: dict[ImageOptions, list] = {}
    out: list[dict[str, bytes]] = [{DIGEST_MEMBER: source_digest(members)} for _, members in samples]
    missing: list[dict[str, SkipSample]] = [{} for _ in samples]
    for encoder in encoders:
        opts = _options(encoder)
        if opts is not None and opts not in images:
            images[opts] = [_attempt(_decode, members, opts) for _, members in samples]
        usable = []
        for i in range(len(samples)):
            problem = captions[i] if encoder.needs_caption and isinstance(captions[i], SkipSample) else None
            if problem is None and opts is not None and isinstance(images[opts][i], SkipSample):
                problem = images[opts][i]
            if problem is None:
                usable.append(i)
            else:
                missing[i].update({name: problem for name in encoder.arrays()})
        decoded = images.get(opts) if opts is not None else None
        for group in _by_shape(usable, decoded):  # one encoder call per image shape (bucket)
            _encode_into(encoder, group, captions, decoded, out, device)
    for members, lacking in zip(out, missing):
        if lacking:
            first = next(iter(lacking.values()))
            note = {"reason": first.reason, "detail": first.detail, "arrays": sorted(lacking)}
            members[SKIP_MEMBER] = json.dumps(note).encode("utf-8")
    return out


def _by_shape(usable: list[int], images: list | None) -> list[list[int]]:
    """`usable` split into groups of one image shape, in order of first appearance (one group without images)."""
    if images is None:
        return [usable] if usable else []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in usable:
        groups.setdefault(images[i][0].shape, []).append(i)
    return list(groups.values())


def _encode_into(encoder: Encoder, usable: list[int], captions: list, images: list | None,
                 out: list[dict[str, bytes]], device: torch.device) -> None:
    pixels, extra = None, {}
    if images is not None:
        pixels = normalize_images(image_batch([images[i][0] for i in usable]), encoder.input, device, torch.float32)
        if getattr(encoder, "options", None) is not None:
            extra["crops"] = [images[i][1] for i in usable]
    texts = [captions[i] for i in usable] if encoder.needs_caption else None
    result = encoder.encode(texts, pixels, **extra)
    for name, spec in encoder.arrays().items():
        array = result[name]
        fits = len(array.shape) == len(spec.shape) + 1 and array.shape[0] == len(usable) and all(
            want is None or want == got for want, got in zip(spec.shape, array.shape[1:]))
        if not fits or str(array.dtype) != spec.dtype:
            raise RuntimeError(f"encoder {encoder.name} returned {name} as {array.dtype} {array.shape}, declared "
                               f"{spec.dtype} (B, {spec.shape})")  # a bug in the encoder class, not user data
        for row, i in enumerate(usable):
            out[i][array_member(name)] = npy_bytes(array[row])
