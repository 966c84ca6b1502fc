"""Streaming a tar shard as samples: members grouped by key, with every failure reported instead of raised.

We iterate the tar ourselves (``tarfile`` in stream mode over webdataset's ``gopen``, so local files, ``file:``
urls and ``pipe:CMD`` all work) rather than through ``webdataset.WebDataset`` because exact resume needs the
in-shard sample index of every sample, the ability to skip samples without reading their bytes, and a clean
signal when a shard is truncated: tarfile (and so webdataset 1.0.2) ends a truncated stream silently when the
cut falls on a header. We detect that through the header error that ended the iteration.

A sample is a run of consecutive members sharing a key, as in webdataset: ``dir/KEY.EXT`` has key ``dir/KEY``
and extension ``EXT`` (everything after the first dot of the base name, lower-cased).
"""
from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Callable, Iterator

from webdataset.gopen import Pipe, gopen

Report = Callable[[str, str], None]  # (reason, detail) for a shard-level problem
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")
# Errors while reading a tar stream: corrupt/truncated archive, failing pipe (IOError), bad gzip.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error)


class _TarInfo(tarfile.TarInfo):
    """Records the header error that ended the archive: only a zero block is a proper end-of-archive."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as exc:  # empty / truncated / invalid header: the data stopped mid-archive
            tar._pipeline_end_error = exc  # type: ignore[attr-defined]
            raise


def split_name(name: str) -> tuple[str, str] | None:
    """``'a/b/KEY.seg.jpg'`` -> ``('a/b/KEY', 'seg.jpg')``; None for names without an extension."""
    if name.startswith("./"):
        name = name[2:]
    match = _KEY_EXT.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def _close(stream: object, early: bool) -> str | None:
    """Close a gopen stream; returns an error text when a pipe command failed. Early close kills the command."""
    if isinstance(stream, Pipe):
        if early and stream.proc.poll() is None:
            stream.proc.kill()
        stream.ignore_errors = True  # judge the exit status here, with a readable message
        try:
            stream.close()
        except _READ_ERRORS:
            pass
        status = stream.proc.wait()
        if not early and status not in (0, 141):  # 141: SIGPIPE after we stopped reading, as webdataset
            return f"command exited with status {status}"
        return None
    try:
        stream.close()  # type: ignore[attr-defined]
    except _READ_ERRORS as exc:
        return str(exc)
    return None


def iter_shard(url: str, report: Report, start: int = 0,
               keep: Callable[[int], bool] | None = None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield ``(index, key, {ext: bytes})`` for the samples of one shard, in order.

    Args:
        url: local path, ``file:``/``pipe:`` or any url ``webdataset.gopen`` opens.
        report: called once with (reason, detail) for ``missing_shard`` / ``unreadable_shard`` /
            ``truncated_shard`` after the last good sample; the shard then ends early (the sample being read
            when the data stopped is dropped: it may be incomplete) and nothing is raised.
        start: samples with index < start are passed over without reading their bytes.
        keep: optional filter on the sample index; samples it rejects are passed over without reading bytes.
    """
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError:
        report("missing_shard", f"{url}: no such file")
        return
    except _READ_ERRORS as exc:
        report("unreadable_shard", f"{url}: cannot open ({exc})")
        return
    status: dict = {"started": False, "error": None}
    try:
        yield from _iter_members(stream, start, keep, status)
    except BaseException:  # closed early by the consumer (GeneratorExit) or a failure downstream
        _close(stream, early=True)
        raise
    problem = _close(stream, early=False) or status["error"]  # a failed command explains a broken tar best
    if problem:
        report("truncated_shard" if status["started"] else "unreadable_shard", f"{url}: {problem}")


def _iter_members(stream: object, start: int, keep: Callable[[int], bool] | None,
                  status: dict) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    index, key, members, wanted = -1, None, {}, False
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo)  # type: ignore[arg-type]
        for info in tar:
            parts = split_name(info.name) if info.isfile() else None
            if parts is None:
                continue
            if parts[0] != key:
                if wanted and members:
                    yield index, key, members  # type: ignore[misc]
                index, key, members = index + 1, parts[0], {}
                status["started"] = True
                wanted = index >= start and (keep is None or keep(index))
            if wanted:
                handle = tar.extractfile(info)
                members[parts[1]] = handle.read() if handle is not None else b""
        end_error = getattr(tar, "_pipeline_end_error", None)
    except _READ_ERRORS as exc:
        status["error"] = str(exc) or type(exc).__name__
        return  # the sample being read is partial: dropped
    if end_error is not None:  # stopped at a cut header: the last sample may be incomplete too
        status["error"] = f"archive ends without an end-of-archive marker ({end_error})"
        return
    if wanted and members:
        yield index, key, members  # type: ignore[misc]
