"""Exceptions shared by every layer of the package (the bottom room: imports nothing of ours)."""

from __future__ import annotations

__all__ = ["CheckpointError", "ChecksumError", "UnsafePathError"]


class CheckpointError(ValueError):
    """The checkpoint is missing, malformed, or does not match the model (the file and field named)."""


class ChecksumError(CheckpointError):
    """A file's size or checksum differs from what was recorded at save time."""


class UnsafePathError(CheckpointError):
    """A path named by a checkpoint (a file in its description, a shard in its index) would be read
    outside the checkpoint directory: absolute, with ``..``, or a symlink leading out."""
