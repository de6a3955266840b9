"""One writer per store: an exclusive ``flock`` on ``<state_dir>/segd.lock``.

The daemon, ``segd refit`` and ``segd sort`` each take the lock before touching the
database or moving files, so two of them never sort into the same library at once.

Why ``flock`` and not a pid file: the kernel drops the lock when the last file
descriptor on it closes, which includes the holder dying by SIGKILL or an OOM kill. There
is never a stale lock to clean up, and no pid-reuse guessing. The pid and role written
into the file are only for the error message; who holds the lock is decided by the kernel.

Rules this module keeps:

* The lock file is never deleted. Unlinking it would let a newcomer lock a fresh inode
  while the old holder still locks the unlinked one: two writers.
* The descriptor is close-on-exec, and a forked child (``multiprocessing`` decode
  workers) closes its inherited copy, so a worker outliving a killed daemon does not keep
  the store locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from segd.core.errors import StoreError

log = logging.getLogger(__name__)

Role = Literal["daemon", "refit", "sort", "undo"]
ROLES: tuple[str, ...] = get_args(Role)

# A prober (`read_lock_holder`) takes a shared lock for a few microseconds; an acquirer
# that hits exactly that moment must not report "in use", so it retries briefly.
_CONTENTION_RETRIES = 10
_CONTENTION_SLEEP_S = 0.02


@dataclass(eq=False)  # identity semantics: each instance is one held descriptor
class StateLock:
    """A held exclusive lock on the store; release it, or use it as a context manager."""

    path: Path
    role: str
    pid: int
    _fd: int | None = field(default=None, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Release the lock; calling it again is harmless."""
        with self._guard:
            fd, self._fd = self._fd, None
        if fd is None:
            return
        _held.discard(self)
        try:
            # Clear the holder line while still locked, so nobody reads a stale pid.
            os.ftruncate(fd, 0)
        except OSError as exc:
            log.debug("could not clear %s: %s", self.path, exc)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def _forget_in_child(self) -> None:
        # After fork: drop this process's reference without touching the file; the
        # parent still holds the lock through its own descriptor.
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


_held: weakref.WeakSet[StateLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_held):
        lock._forget_in_child()
    _held.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def acquire_state_lock(path: Path, role: str = "daemon") -> StateLock:
    """Take the store's exclusive lock at ``path`` without waiting.

    Raises StoreError naming the current holder (pid and role) when the lock is taken.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        _fix_mode(fd, path)
        if not _try_flock(fd, fcntl.LOCK_EX):
            holder = read_lock_holder(path)
            raise StoreError(_in_use_message(path, holder))
        pid = os.getpid()
        os.ftruncate(fd, 0)
        # One small pwrite: a reader sees either nothing or the whole line.
        os.pwrite(fd, f"{pid} {role}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    lock = StateLock(path=path, role=role, pid=pid, _fd=fd)
    _held.add(lock)
    return lock


def read_lock_holder(path: Path) -> tuple[int, str] | None:
    """``(pid, role)`` of the process holding the lock at ``path``, or None when free.

    The kernel decides whether the lock is held (a non-blocking shared flock probe), so a
    pid left in the file by a killed holder is never reported. The pid is as the holder
    saw it: in another pid namespace (a container) it may not match the host's.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        # The holder truncates and writes its line right after locking: an empty or
        # partial line while the lock is held means "look again in a moment".
        for _ in range(_CONTENTION_RETRIES):
            if _try_flock(fd, fcntl.LOCK_SH, retries=1):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            holder = _parse(os.pread(fd, 256, 0))
            if holder is not None:
                return holder
            time.sleep(_CONTENTION_SLEEP_S)
        return (0, "unknown")
    finally:
        os.close(fd)


def _try_flock(fd: int, kind: int, retries: int = _CONTENTION_RETRIES) -> bool:
    for attempt in range(retries):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if attempt + 1 < retries:
            time.sleep(_CONTENTION_SLEEP_S)
    return False


def _fix_mode(fd: int, path: Path) -> None:
    # os.open's mode only applies when it creates the file; an older file (or one made
    # under a loose umask by hand) is tightened here when it is ours to change.
    try:
        if os.fstat(fd).st_mode & 0o777 != 0o600:
            os.fchmod(fd, 0o600)
    except PermissionError:
        log.debug("cannot set mode 0600 on %s (not the owner)", path)


def _parse(raw: bytes) -> tuple[int, str] | None:
    parts = raw.decode("ascii", "replace").split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1]


def _in_use_message(path: Path, holder: tuple[int, str] | None) -> str:
    if holder is None:  # released between our attempt and the probe
        who = "another process (it just let go; try again)"
    elif holder[0] == 0:
        who = "another process"
    else:
        who = f"pid {holder[0]} ({holder[1]})"
    return f"the segd store is in use by {who}; lock file {path}"
