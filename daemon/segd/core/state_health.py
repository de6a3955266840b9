"""Whether the state folder can take commits: which failures mean it is full, read-only or
failing, and the pause that waits (probing now and then) until it can again."""

from __future__ import annotations

import errno
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from segd.core.errors import SegdError

Kind = Literal["full", "read-only", "failing", "not writable"]

# SQLite's primary result codes (the low byte of an extended code, e.g. SQLITE_IOERR_WRITE).
_SQLITE_KINDS: Final[dict[int, Kind]] = {
    13: "full",  # SQLITE_FULL
    8: "read-only",  # SQLITE_READONLY
    10: "failing",  # SQLITE_IOERR
}
# For an error that carries no code (raised by hand, or by an older sqlite3 module).
_SQLITE_MESSAGES: Final[dict[str, Kind]] = {
    "database or disk is full": "full",
    "attempt to write a readonly database": "read-only",
    "disk i/o error": "failing",
}
_ERRNO_KINDS: Final[dict[int, Kind]] = {
    errno.ENOSPC: "full",
    errno.EDQUOT: "full",
    errno.EROFS: "read-only",
    errno.EIO: "failing",
    errno.EACCES: "not writable",
    errno.EPERM: "not writable",
}


@dataclass(frozen=True, slots=True)
class StateUnavailable:
    """Why the state folder cannot take commits now."""

    kind: Kind
    detail: str  # the error as SQLite or the kernel put it

    def describe(self, state_dir: Path) -> str:
        return f"the state folder {state_dir} is {self.kind} ({self.detail})"


class StateUnavailableError(SegdError):
    """Refused: the state folder cannot take commits (full, read-only or failing)."""


def classify(exc: BaseException, state_dir: Path) -> StateUnavailable | None:
    """The state folder's trouble behind `exc`, or None when `exc` is about something else.

    SQLite's errors count wherever they come from (they are always about the store); an
    OSError only when it names a file in the state folder: a full or read-only *library*
    is the library's business, and the daemon already leaves such files in the inbox."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found = _one(current, state_dir)
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _one(exc: BaseException, state_dir: Path) -> StateUnavailable | None:
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        kind = _SQLITE_KINDS.get(code & 0xFF) if isinstance(code, int) else None
        if kind is None:
            text = str(exc).lower()
            kind = next((k for m, k in _SQLITE_MESSAGES.items() if m in text), None)
        return None if kind is None else StateUnavailable(kind, str(exc))
    if isinstance(exc, OSError) and exc.errno in _ERRNO_KINDS and _inside(exc, state_dir):
        return StateUnavailable(_ERRNO_KINDS[exc.errno], exc.strerror or str(exc))
    return None


def _inside(exc: OSError, state_dir: Path) -> bool:
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    root = os.path.abspath(state_dir)
    return any(os.path.commonpath([root, os.path.abspath(os.fsdecode(n))]) == root
               for n in names)


def space_verdict(read_only: bool, free_bytes: int, need_bytes: int) -> StateUnavailable | None:
    """What a filesystem's own figures (statvfs) say before anything is written to it."""
    if read_only:
        return StateUnavailable("read-only", "mounted read-only")
    if free_bytes < need_bytes:
        return StateUnavailable("full", f"{free_bytes} bytes free, {need_bytes} needed")
    return None


@dataclass
class StatePause:
    """The daemon's pause while the state folder cannot take commits: when it began, why,
    and when to probe next. Not thread-safe: the daemon holds a lock around it."""

    probe_every_s: float
    reason: StateUnavailable | None = None
    since: float = 0.0  # monotonic time the pause began
    next_probe: float = 0.0

    @property
    def paused(self) -> bool:
        return self.reason is not None

    def pause(self, reason: StateUnavailable, now: float) -> bool:
        """Enter the pause; True only for the failure that begins it (say so once)."""
        if self.reason is not None:
            return False
        self.reason, self.since, self.next_probe = reason, now, now + self.probe_every_s
        return True

    def probe_due(self, now: float) -> bool:
        return self.reason is not None and now >= self.next_probe

    def probe_failed(self, reason: StateUnavailable, now: float) -> None:
        """Still unavailable (perhaps for another reason now): probe again later."""
        self.reason, self.next_probe = reason, now + self.probe_every_s

    def resume(self, now: float) -> float:
        """Leave the pause; returns how long it lasted (0 when there was none)."""
        if self.reason is None:
            return 0.0
        self.reason = None
        return now - self.since
