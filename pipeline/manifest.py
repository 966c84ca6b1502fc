"""File manifests: relative path -> size + sha256 of every file, written last, verified first (checkpoints
under pipeline/train and the export bundle both use them).

A checkpoint directory is *complete* exactly when its ``MANIFEST.json`` exists: the manifest is written (atomically)
only after every rank finished writing its files, so its presence proves the save finished, and its checksums
prove that no file was truncated or damaged since.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import CheckpointError

MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(ckpt_dir: Path) -> list[str]:
    """Every regular file below `ckpt_dir` except the manifest, as sorted POSIX relative paths."""
    files = [p.relative_to(ckpt_dir).as_posix() for p in ckpt_dir.rglob("*") if p.is_file()]
    return sorted(f for f in files if f != MANIFEST and not f.endswith(".tmp"))


def describe(ckpt_dir: Path, relpaths: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """{relpath: {"size": bytes, "sha256": hex}} for the given files (each rank hashes its share)."""
    return {rel: {"size": (ckpt_dir / rel).stat().st_size, "sha256": sha256_file(ckpt_dir / rel)}
            for rel in relpaths}


def write_json_atomic(path: Path, payload: object) -> None:
    """Write JSON via a temp file, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_manifest(ckpt_dir: Path, entries: dict[str, dict[str, int | str]]) -> None:
    """Write MANIFEST.json (the completion marker) for the described files."""
    write_json_atomic(ckpt_dir / MANIFEST, {"manifest_version": MANIFEST_VERSION, "files": entries})


def read_manifest(ckpt_dir: Path) -> dict[str, dict[str, int | str]]:
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint ({MANIFEST} missing: the save was interrupted)")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        files = payload["files"]
        version = payload["manifest_version"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    if version != MANIFEST_VERSION:
        raise CheckpointError(f"{path}: manifest version {version} is not supported (expected {MANIFEST_VERSION})")
    return files


def verify_files(ckpt_dir: Path, entries: dict[str, dict[str, int | str]], relpaths: Iterable[str]) -> list[str]:
    """Problems (one line each, naming the file) among `relpaths`; empty when they all match the manifest."""
    problems = []
    for rel in relpaths:
        expected = entries[rel]
        path = ckpt_dir / rel
        if not path.is_file():
            problems.append(f"{path}: missing (listed in {MANIFEST})")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, manifest says {expected['size']}")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{path}: sha256 mismatch (file corrupted since it was written)")
    return problems


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Check every file of `ckpt_dir` against its manifest (single process); CheckpointError on any problem."""
    entries = read_manifest(ckpt_dir)
    problems = verify_files(ckpt_dir, entries, sorted(entries))
    if problems:
        raise CheckpointError(f"corrupted checkpoint: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
