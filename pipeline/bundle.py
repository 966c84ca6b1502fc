"""The export bundle: one folder of components every tool loads, indexed by ``bundle.json``.

Layout (each component is what its users' library loads directly)::

    clip/          open_clip ``local-dir:`` folder
    t5/            transformers ``save_pretrained`` folder + tokenizer (or a reference to the original path)
    prior/         diffusers PriorTransformer folder + scheduler config + t2i_prior.json (PRIOR_META)
    autoencoder/   diffusers AutoencoderKL / VQModel folder (scaling_factor, shift_factor in its config)
    unet_<name>/   diffusers UNet2DConditionModel (or PixArtTransformer2DModel, backbone dit) folder + scheduler
                   config + t2i_stage.json (STAGE_META: also "buckets", the [height, width] output shapes the stage
                   was trained on and samples)
    bundle.json    format version, every component (its stage, checkpoint, step, EMA, dtype, the size and
                   sha256 of every file) and the cascade: the unet components in order of resolution with each
                   stage's resolution, space and default sampling settings
    .lock          taken by writers (:func:`bundle_lock`)

Several runs export into one bundle (one component each, merged into the index atomically), also at the same time
from several processes: writers hold :func:`bundle_lock`. Readers verify every file of the components they use
against the index before loading anything (:meth:`Bundle.open`).
"""
from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CheckpointError, PipelineError
from pipeline import manifest

BUNDLE_JSON = "bundle.json"
BUNDLE_FORMAT = 2
# Our facts about a component, next to the library's own files: what a sampler needs beyond the library's config
# (a U-Net stage's resolution, space and conditioning; an autoencoder's latent geometry; the prior's CLIP).
STAGE_META = "t2i_stage.json"
PRIOR_META = "t2i_prior.json"


def describe_files(folder: Path) -> dict[str, dict[str, int | str]]:
    """{relative path: {"size", "sha256"}} of every file below `folder`."""
    return manifest.describe(folder, manifest.list_files(folder))


def read_index(bundle: Path) -> dict[str, Any]:
    """The parsed bundle.json of `bundle` (CheckpointError if it is missing, unreadable or of another format)."""
    path = Path(bundle) / BUNDLE_JSON
    if not path.is_file():
        raise CheckpointError(f"{bundle}: not an export bundle (no {BUNDLE_JSON}; write one with "
                              "python -m pipeline export RUN_DIR --out BUNDLE)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable bundle index ({exc})") from None
    if not isinstance(index, dict) or index.get("format_version") != BUNDLE_FORMAT:
        found = index.get("format_version") if isinstance(index, dict) else None
        raise CheckpointError(f"{path}: bundle format {found}, this version reads {BUNDLE_FORMAT}; re-export it")
    return index


def cascade_order(components: dict[str, dict[str, Any]]) -> list[str]:
    """The unet components, base first, then super-resolution stages by output resolution."""
    unets = [(entry.get("low_res", 0) > 0, entry.get("resolution", 0), name)
             for name, entry in components.items() if entry.get("kind") == "unet"]
    return [name for _, _, name in sorted(unets)]


@contextmanager
def bundle_lock(bundle: Path) -> Iterator[None]:
    """Hold the bundle's writer lock (an flock on BUNDLE/.lock, released if the holder dies).

    Exports of several runs into one bundle may run at once (the demo's two training chains, a team's export
    jobs): without it two writers of bundle.json each drop the other's component, and two U-Net stages rewrite
    the shared t5/ folder under each other. Not re-entrant: take it once around a whole export.
    """
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    with open(bundle / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_component(bundle: Path, name: str, entry: dict[str, Any]) -> None:
    """Index component `name` (its folder already written) with the size and sha256 of every file; atomic for
    readers; concurrent writers hold :func:`bundle_lock`."""
    bundle = Path(bundle)
    index = read_index(bundle) if (bundle / BUNDLE_JSON).is_file() else {"format_version": BUNDLE_FORMAT,
                                                                          "components": {}}
    folder = bundle / name
    entry = {**entry, "files": describe_files(folder) if folder.is_dir() else {}}
    index["components"][name] = entry
    index["cascade"] = cascade_order(index["components"])
    manifest.write_json_atomic(bundle / BUNDLE_JSON, index)


@dataclass
class Bundle:
    """A verified bundle: every file of every component matched bundle.json's size and sha256 when opened."""

    path: Path
    index: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Read the index and verify every listed file (missing, truncated or altered -> one-line error)."""
        path = Path(path)
        index = read_index(path)
        for name, entry in index["components"].items():
            folder = path / name
            files = entry.get("files", {})
            problems = manifest.verify_files(folder, files, sorted(files))
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise CheckpointError(f"bundle component {name!r} is damaged: {problems[0]}{more}")
        return cls(path, index)

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.index["components"]

    def has(self, name: str) -> bool:
        return name in self.components

    def entry(self, name: str) -> dict[str, Any]:
        if name not in self.components:
            raise PipelineError(f"{self.path}: the bundle has no {name!r} component (it has "
                                f"{', '.join(sorted(self.components)) or 'none'}); export the run that makes it "
                                f"into this bundle")
        return self.components[name]

    def folder(self, name: str) -> Path:
        self.entry(name)
        return self.path / name

    def cascade(self) -> list[str]:
        """The cascade's unet components in order; a bundle without a base stage cannot sample."""
        order = cascade_order(self.components)
        if not order or self.components[order[0]].get("low_res", 0):
            raise PipelineError(f"{self.path}: the bundle has no base U-Net stage (components: "
                                f"{', '.join(sorted(self.components)) or 'none'}); export a unet base run into it")
        return order
