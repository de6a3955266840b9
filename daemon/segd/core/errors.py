"""Every error segd raises on purpose, in one place.

Errors about a single input file carry the file's path and a short machine-readable
``kind`` so the quarantine and the `segd sort` report can say why a file was set aside.
"""

from __future__ import annotations

from pathlib import Path


class SegdError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class ConfigError(SegdError):
    """The configuration is invalid; the message names the offending key."""

    def __init__(self, key: str, problem: str, source: str | Path | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = str(source) if source is not None else None
        where = f" in {self.source}" if self.source else ""
        super().__init__(f"config key '{key}'{where}: {problem}")


class ImageError(SegdError):
    """A single input file could not be turned into an image."""

    kind = "unreadable"

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {self.kind}: {reason}")


class EmptyFileError(ImageError):
    kind = "empty"


class TruncatedImageError(ImageError):
    kind = "truncated"


class CorruptImageError(ImageError):
    kind = "corrupt"


class NotAnImageError(ImageError):
    kind = "not-an-image"


class UnsupportedFormatError(ImageError):
    kind = "unsupported"


class ImageTooLargeError(ImageError):
    kind = "too-large"


class FileAccessError(ImageError):
    """The file could not be read at all: permission denied, vanished, not a regular file."""

    kind = "inaccessible"


class ModelError(SegdError):
    """The ONNX model is missing, malformed or lacks the metadata segd needs."""


class ProviderError(SegdError):
    """A required execution provider (the GPU) is not active."""


class StoreError(SegdError):
    """The state database cannot be opened or is in use by another writer."""


class ControlError(SegdError):
    """The daemon's control socket cannot be served or reached, or gave no valid answer."""
