"""File placement that never overwrites and never leaves half-written files behind.

Every placement ends in a no-clobber link (`os.link` fails with EEXIST instead of replacing),
so a name collision, even one created by another process a microsecond earlier, gets the
next free suffix rather than destroying a file. Across filesystems the bytes are copied to
a temporary name in the destination folder, fsynced, and only then linked into place.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".segd-tmp-"
MAX_NAME_BYTES = 255
NO_HARDLINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


def candidate_names(name: str) -> Iterator[str]:
    """Names to try for `name`: as is, then `stem (2).ext`, `stem (3).ext`..."""
    return (_suffixed(name, i) for i in range(1, 100_000))


def _suffixed(name: str, i: int) -> str:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext, dot = name, "", ""
    tag = f" ({i})" if i > 1 else ""
    return _fit_name(stem, tag + dot + ext)


def _fit_name(stem: str, tail: str = "") -> str:
    """Trim `stem` (whole characters) so that stem + tail fits the 255-byte name limit."""
    budget = MAX_NAME_BYTES - len(os.fsencode(tail))
    while len(os.fsencode(stem)) > budget:
        stem = stem[:-1]
    return stem + tail


def link_no_clobber(src: Path, folder: Path, name: str) -> Path:
    """Hard-link `src` into `folder` under `name` or the next free suffixed name."""
    for candidate in candidate_names(name):
        target = folder / candidate
        try:
            os.link(src, target, follow_symlinks=False)
            return target
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in NO_HARDLINKS:
                raise
            # A filesystem without hard links (vfat, some FUSE mounts): check, then rename.
            # Not atomic against a concurrent writer of the same name, the best such
            # filesystems allow.
            if target.exists() or target.is_symlink():
                continue
            os.rename(src, target)
            return target
    raise FileExistsError(errno.EEXIST, "no free name", str(folder / name))


def copy_to_temp(src: Path, folder: Path, tag: str, *, sync: bool = True) -> Path:
    """Copy src's bytes to a fresh temporary file in `folder` (fsynced unless told not to:
    a copy whose source stays may be synced in bulk later); return its path."""
    tmp = folder / f"{TMP_PREFIX}{tag}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd_in = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        mode = stat.S_IMODE(os.fstat(fd_in).st_mode) or 0o644
        fd_out = os.open(tmp, flags, mode)
        try:
            with os.fdopen(fd_in, "rb", closefd=False) as fin, \
                    os.fdopen(fd_out, "wb", closefd=False) as fout:
                shutil.copyfileobj(fin, fout, length=1 << 20)
                fout.flush()
                if sync:
                    os.fsync(fout.fileno())
        finally:
            os.close(fd_out)
    except BaseException:
        # Keep the original error (ENOSPC, EROFS...) even if the cleanup fails too.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd_in)
    shutil.copystat(src, tmp, follow_symlinks=False)
    return tmp


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(folder: Path, mode: int = 0o777) -> None:
    """`mkdir -p` that survives a power cut: each folder made here is fsynced into its
    parent. A new name is durable only once its directory is synced, and files linked into
    a folder whose own name is lost are lost with it (their source already unlinked)."""
    missing: list[Path] = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for made in reversed(missing):
        try:
            os.mkdir(made, mode)
        except FileExistsError:
            if not made.is_dir():
                raise
        fsync_dir(made.parent)


def place_copy(src: Path, folder: Path, name: str, tag: str, *, sync: bool = True) -> Path:
    """Copy `src` into `folder` without ever overwriting; `src` stays. Returns the new path.
    With sync=False the caller syncs later (the source still exists, nothing can be lost)."""
    make_dirs(folder)
    tmp = copy_to_temp(src, folder, tag, sync=sync)
    try:
        final = link_no_clobber(tmp, folder, name)
    finally:
        tmp.unlink(missing_ok=True)
    if sync:
        fsync_dir(folder)
    return final


def place_move(src: Path, folder: Path, name: str, tag: str) -> Path:
    """Move `src` into `folder` without ever overwriting. Returns the new path.

    Same filesystem: link under the free name, then unlink the source (a crash between
    the two leaves two names for one inode, which recovery resolves). Otherwise: copy,
    fsync, link, then unlink the source. The source is unlinked only if it is still the
    file that was placed, so a new file dropped under the same name meanwhile survives.
    """
    make_dirs(folder)
    before = os.lstat(src)
    if before.st_dev == os.stat(folder).st_dev:
        final = link_no_clobber(src, folder, name)
    else:
        final = place_copy(src, folder, name, tag)
    fsync_dir(folder)
    remove_if_unchanged(src, before)
    return final


def remove_if_unchanged(path: Path, expected: os.stat_result, *, sync: bool = True) -> bool:
    """Unlink `path` if it is still the file described by `expected`; True if removed.
    With sync=False the caller fsyncs the folder (once for many files).

    The name is first renamed to a private one and only that name is unlinked, once it is
    known to hold `expected`: a file that replaced `path` between the check and an unlink
    by name would be the one unlinked. A replacement caught that way gets its name back
    (or the next free one). A crash in between leaves `hidden_name(path)`, which the
    journal's recovery resolves the same way."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    if not same_version(now, expected):
        return False
    hidden = hidden_name(path)
    try:
        os.rename(path, hidden)
    except FileNotFoundError:
        return False
    removed = same_version(os.lstat(hidden), expected)
    if removed:
        os.unlink(hidden)
    else:
        give_back(hidden, path)
    if sync:
        fsync_dir(path.parent)
    return removed


def same_version(a: os.stat_result, b: os.stat_result) -> bool:
    """The same file, unchanged: same inode, size and modification time."""
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (
        b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


def hidden_name(path: Path) -> Path:
    """The private name `remove_if_unchanged` takes `path`'s name away under."""
    return path.with_name(_fit_name(f"{TMP_PREFIX}unlink-{path.name}"))


def give_back(hidden: Path, path: Path) -> Path:
    """Give the file under a private name `path`'s name again, or the next free one,
    without overwriting anything; return the name it has."""
    name = link_no_clobber(hidden, path.parent, path.name)
    hidden.unlink(missing_ok=True)  # gone already where the filesystem had to rename
    return name


def write_csv_new(folder: Path, name: str, header: list[str], rows: list[list[object]]) -> Path:
    """Write a CSV under `name` (or a free suffixed name), complete or not at all."""
    make_dirs(folder)
    tmp = folder / f"{TMP_PREFIX}{os.getpid()}-{name}"
    try:
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        return link_no_clobber(tmp, folder, name)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes, never through a symlink; None if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb", opener=_open_no_follow) as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _open_no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)
