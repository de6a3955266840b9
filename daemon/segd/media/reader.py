"""Read a file's bytes for decoding: regular files only, bounded, never blocking on a FIFO.

A device node could stream forever and a FIFO block until a writer appears, so both are refused
before they are opened; every failure is an ImageError naming the file.
"""

from __future__ import annotations

import io
import os
import stat

from segd.core.errors import FileAccessError, ImageTooLargeError

__all__ = ["read_regular_file"]


def read_regular_file(path: str | os.PathLike[str], limit: int, *,
                      follow_symlinks: bool = True) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most `limit` bytes, and the stat they were read under.

    follow_symlinks=False refuses a symlink (FileAccessError) instead of reading its target.
    """
    name = os.fspath(path)
    # stat first: opening a FIFO for reading would block until a writer appears, and a device
    # node could stream forever. Only regular files (or symlinks to them) are images.
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError as exc:
        raise FileAccessError(name, _os_reason(exc)) from exc
    if stat.S_ISLNK(st.st_mode):
        raise FileAccessError(name, "symbolic link (not followed)")
    if not stat.S_ISREG(st.st_mode):
        raise FileAccessError(name, f"not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size > limit:
        raise ImageTooLargeError(name, f"file is {st.st_size} bytes, over the {limit} byte limit")
    # O_NONBLOCK: belt and braces in case the path was swapped for a FIFO after the stat.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileAccessError(name, _os_reason(exc)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileAccessError(name, f"not a regular file ({_file_kind(st.st_mode)})")
        with io.FileIO(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # the file may grow while we read: stay bounded
    except OSError as exc:
        raise FileAccessError(name, _os_reason(exc)) from exc
    finally:
        os.close(fd)
    if data is None:  # only possible for a non-blocking non-regular file; be explicit anyway
        raise FileAccessError(name, "no data available")
    if len(data) > limit:
        raise ImageTooLargeError(name, f"file is over the {limit} byte limit")
    return data, st


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file does not exist (vanished?)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "not a regular file (directory)"
    return f"cannot read: {exc.strerror or exc}"


def _file_kind(mode: int) -> str:
    for test, label in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return label
    return "special file"

