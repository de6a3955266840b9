"""Listing the inbox: the candidate files, their stat signatures, and the names left alone."""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from segd.core.readiness import Signature

log = logging.getLogger(__name__)


def is_ignored(name: str, patterns: Sequence[str]) -> bool:
    """Whether a basename matches one of the ignore patterns (temporary and hidden names).

    Matching is case-insensitive: Windows tools over SMB write ``.TMP`` and ``.PART`` too,
    and no photo is named like a temporary file.
    """
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


def scan_inbox(inbox: Path, *, recursive: bool, patterns: Sequence[str]) -> Iterator[Path]:
    """The candidate files in the inbox, oldest mtime first, then by path.

    Yields regular files and symlinks (the daemon quarantines symlinks, so it must see them;
    a symlinked directory is never descended into). Skips ignored names, including whole
    ignored subfolders such as ``.thumbnails``, and anything that is not a file (FIFOs,
    sockets, devices: opening a FIFO would hang the daemon). Raises OSError if the inbox
    itself cannot be listed; unreadable subfolders are skipped.
    """
    for path, _sig in scan_with_signatures(inbox, recursive=recursive, patterns=patterns):
        yield path


def scan_with_signatures(inbox: Path, *, recursive: bool,
                         patterns: Sequence[str]) -> list[tuple[Path, Signature]]:
    found: list[tuple[Path, Signature]] = []
    pending_dirs = [inbox]
    while pending_dirs:
        folder = pending_dirs.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            if folder == inbox:
                raise
            log.debug("cannot list %s, skipping it", folder, exc_info=True)
            continue
        for entry in entries:
            if is_ignored(entry.name, patterns):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # vanished between listing and stat
                continue
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                found.append((Path(entry.path), signature(st)))
            elif stat.S_ISDIR(st.st_mode) and recursive:
                pending_dirs.append(Path(entry.path))
    found.sort(key=lambda item: (item[1].mtime_ns, str(item[0])))
    return found


def signature(st: os.stat_result) -> Signature:
    return Signature(st.st_size, st.st_mtime_ns, st.st_ino)


def lstat_signature(path: Path) -> Signature | None:
    """The signature of a regular file or symlink; None if gone or anything else."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return None
    return signature(st)
