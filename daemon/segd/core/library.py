"""Names inside the library: cluster folders and the reserved folders beside them."""

from __future__ import annotations

import re
from pathlib import Path

from segd.core.errors import SegdError

UNREADABLE_FOLDER = "_unreadable"
_SAFE = re.compile(r"^[^/\x00]+$")


def cluster_folder_name(number: int) -> str:
    return f"cluster-{number:02d}"


def safe_folder(library: Path, name: str) -> Path:
    """`library / name`, refusing any name that would land outside the library.

    Folder names come from the store and from users renaming folders; neither may point
    segd at a path like `../../etc`.
    """
    if not _SAFE.match(name) or name in (".", "..") or name.startswith(".segd"):
        raise SegdError(f"unsafe cluster folder name {name!r}")
    return library / name
