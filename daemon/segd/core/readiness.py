"""When an inbox file is complete: events, stat signatures and clock readings in, ready paths out.

`Readiness` is the watcher's decision logic with nothing else: no threads, no locks, no
file system calls. The caller feeds it what the observer and its own scans saw, plus the
result of stat calls it made, and delivers the paths that come back. The clocks are
injected, so every rule can be run against a fake one.

The rules, by mode:

* ``inotify``: a file is ready when the kernel reports it closed after writing
  (`closed`) or renamed into the inbox (`moved_in`). A symlink is ready when created (it
  gets no close event). A scanned file (start-up, periodic rescan, a folder that arrived
  whole) whose mtime is at least ``quiet_s`` old is ready at once; a younger one, or one
  with an mtime in the future (clock skew), may be mid-copy by a writer that started before
  the watch, so it waits out the quiet period. Write activity on it (`written`) cancels
  that wait, since the writer's close will deliver it.
* ``polling``: every event is only a hint. A file is ready once its signature (size,
  mtime, inode) stayed the same for ``quiet_s``; scanned files go through the same period
  whatever their age.

Folders that inotify could not watch (its watch limit) are *polled folders*: files in them
follow the polling rules, and `polled` takes the caller's periodic listing of such a folder
and starts the quiet period for files that are new or changed since they were last ready.

The quiet period is a two-step check so that the caller can stat without holding its
lock: `begin_check` names the files to stat, `finish_check` judges the results. A file
re-tracked between the two steps is left for the next round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Mode = Literal["inotify", "polling"]


@dataclass(frozen=True)
class Signature:
    """What the quiet period compares: a file counts as unchanged while all three are."""

    size: int
    mtime_ns: int
    inode: int


# A stat of one inbox path: its signature, or None if it is gone or no longer a regular
# file or symlink.
StatFn = Callable[[Path], "Signature | None"]


@dataclass
class _Pending:
    """A file waiting out its quiet period."""

    serial: int  # tells a re-tracked file from the entry a check was started for
    signature: Signature | None  # None: known from an event, not stat'ed yet
    stable_since: float  # monotonic time `signature` was first observed


@dataclass(frozen=True)
class QuietCheck:
    """The files waiting at one instant: what the caller stats before `finish_check`."""

    entries: tuple[tuple[Path, int], ...]
    started: float  # monotonic time before any of the stats

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.entries]


class Readiness:
    """Decides which inbox files are complete; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        mode: Mode,
        quiet_s: float,
        monotonic: Callable[[], float],
        wall_ns: Callable[[], int],
    ) -> None:
        self._mode: Mode = mode
        self._quiet_s = quiet_s
        self._quiet_ns = int(quiet_s * 1e9)
        self._monotonic = monotonic
        self._wall_ns = wall_ns
        self._pending: dict[Path, _Pending] = {}
        self._serial = 0
        # Polled folder -> the signature each of its files had when last ready, so that a
        # listing reports only what is new or changed.
        self._polled: dict[Path, dict[Path, Signature]] = {}

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def waiting(self) -> frozenset[Path]:
        """The files in their quiet period."""
        return frozenset(self._pending)

    @property
    def polled_folders(self) -> frozenset[Path]:
        return frozenset(self._polled)

    def reset(self, mode: Mode | None = None) -> None:
        """Forget every file and polled folder (the watch is rebuilt), optionally in a new mode."""
        self._pending.clear()
        self._polled.clear()
        if mode is not None:
            self._mode = mode

    # -- events ----------------------------------------------------------------------------

    def closed(self, path: Path) -> list[Path]:
        """The kernel saw `path` closed after writing."""
        return self._complete(path) if self._mode == "inotify" else self._hint(path)

    def moved_in(self, path: Path) -> list[Path]:
        """`path` was renamed into the inbox (from elsewhere, or from an ignored name)."""
        return self._complete(path) if self._mode == "inotify" else self._hint(path)

    def written(self, path: Path, *, symlink: bool = False) -> list[Path]:
        """`path` was created or modified; `symlink`: it was created as a symlink."""
        if self._mode == "polling":
            return self._hint(path)
        if symlink:
            return self._complete(path)
        # A writer is active: its close delivers the file, so a scan's quiet-period
        # fallback must not fire mid-write.
        self._pending.pop(path, None)
        return []

    def deleted(self, path: Path) -> None:
        """`path` was deleted or moved out of the inbox."""
        self._pending.pop(path, None)
        folder = self._polled_folder_of(path)
        if folder is not None:
            self._polled[folder].pop(path, None)

    # -- scans -----------------------------------------------------------------------------

    def scanned(self, entries: Iterable[tuple[Path, Signature]]) -> list[Path]:
        """Files found by a scan of the inbox or a folder in it: the ready ones come back."""
        now_ns = self._wall_ns()
        ready: list[Path] = []
        for path, signature in entries:
            # A future mtime (clock skew) counts as recent: the quiet period decides.
            if not self.is_polled(path) and now_ns - signature.mtime_ns >= self._quiet_ns:
                ready.extend(self._complete(path))
            else:
                self._track(path, signature)
        return ready

    def poll_folder(self, folder: Path) -> bool:
        """Poll `folder` and everything below it; False if a polled folder already covers it."""
        if self._polled_folder_of(folder) is not None:
            return False
        settled: dict[Path, Signature] = {}
        for inner in [f for f in self._polled if f.is_relative_to(folder)]:
            settled.update(self._polled.pop(inner))
        self._polled[folder] = settled
        return True

    def unpoll_folder(self, folder: Path) -> None:
        """`folder` is gone: stop polling it."""
        self._polled.pop(folder, None)

    def is_polled(self, path: Path) -> bool:
        """Whether `path` follows the polling rules (polling mode, or in a polled folder)."""
        return self._mode == "polling" or self._polled_folder_of(path) is not None

    def polled(self, folder: Path, entries: Iterable[tuple[Path, Signature]]) -> None:
        """A listing of polled `folder`: new and changed files start their quiet period."""
        settled = self._polled.get(folder)
        if settled is None:
            return  # no longer polled (gone, or the watch was rebuilt meanwhile)
        still: dict[Path, Signature] = {}
        for path, signature in entries:
            if settled.get(path) == signature:
                still[path] = signature
            else:
                self._track(path, signature)
        self._polled[folder] = still  # files gone from the listing are forgotten

    # -- the quiet period ------------------------------------------------------------------

    def begin_check(self) -> QuietCheck:
        """Start a quiet-period check: stat `paths` of the result, then `finish_check`."""
        entries = tuple((path, entry.serial) for path, entry in self._pending.items())
        return QuietCheck(entries, self._monotonic())

    def finish_check(
        self, check: QuietCheck, observed: Mapping[Path, Signature | None]
    ) -> list[Path]:
        """Judge the stats made for `check`: the files unchanged for long enough come back."""
        now = self._monotonic()
        ready: list[Path] = []
        for path, serial in check.entries:
            entry = self._pending.get(path)
            if entry is None or entry.serial != serial or path not in observed:
                continue  # delivered or forgotten meanwhile, or tracked anew: next round
            signature = observed[path]
            if signature is None:
                del self._pending[path]
            elif signature != entry.signature:
                # The stat may have come any time before `now`: restart late, to be safe.
                entry.signature = signature
                entry.stable_since = now
            elif check.started - entry.stable_since >= self._quiet_s:
                del self._pending[path]
                ready.append(path)
                folder = self._polled_folder_of(path)
                if folder is not None:
                    self._polled[folder][path] = signature
        return ready

    def check_quiet(self, stat: StatFn) -> list[Path]:
        """Both steps of the quiet-period check, stat'ing with `stat`."""
        check = self.begin_check()
        return self.finish_check(check, {path: stat(path) for path in check.paths})

    # -- helpers ---------------------------------------------------------------------------

    def _complete(self, path: Path) -> list[Path]:
        self._pending.pop(path, None)
        return [path]

    def _hint(self, path: Path) -> list[Path]:
        self._track(path, None)
        return []

    def _track(self, path: Path, signature: Signature | None) -> None:
        """Start the quiet period for `path` unless it is already running."""
        if path not in self._pending:
            self._serial += 1
            self._pending[path] = _Pending(self._serial, signature, self._monotonic())

    def _polled_folder_of(self, path: Path) -> Path | None:
        if not self._polled:
            return None
        return next((p for p in (path, *path.parents) if p in self._polled), None)
