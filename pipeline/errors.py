"""Errors a user can cause, each mapped to one clear message and an exit code by the CLI.

Anything deriving from :class:`PipelineError` is printed as a single line (no traceback unless ``--debug``).
"""
from __future__ import annotations


class PipelineError(Exception):
    """A failure the user can act on (exit code 1): missing shard, unreadable checkpoint, ..."""

    exit_code = 1


class UsageError(PipelineError):
    """Bad command-line usage or configuration (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration file or ``--set`` override that does not match the schema."""


class DataError(PipelineError):
    """Shards that cannot be read, are misaligned, or produced too many skipped samples."""


class CheckpointError(PipelineError):
    """A checkpoint that is missing, incomplete, corrupted or incompatible with the current code/config."""
