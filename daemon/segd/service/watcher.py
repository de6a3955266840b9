"""The inbox watcher: filesystem activity in, complete candidate files out.

`InboxWatcher` calls ``on_ready(path)`` for every file in the inbox that looks complete. It
never reports a file merely because it appeared or grew; what counts as "complete" depends
on the mode:

* ``inotify`` (Linux, ``watch.polling: false``): a file is ready when the kernel reports it
  closed after writing (``FileClosedEvent``) or renamed into the inbox (``FileMovedEvent``
  whose destination is inside it: a move from elsewhere, or ``foo.jpg.part`` -> ``foo.jpg``).
  Read-only closes and opens are not even requested from the kernel, so the daemon
  reading a photo cannot make it re-deliver itself.
* ``polling`` (NFS, SMB, SSHFS, where inotify sees nothing, or where inotify cannot start):
  watchdog's polling events are only hints; a file is ready once its size, mtime and inode
  stayed the same for ``quiet_s``.

Scans (at start, every ``rescan_interval_s``, after the observer had to be restarted) cover
what events cannot: files present before start and events the kernel dropped. In polling
mode a scanned file goes through the same quiet period. In inotify mode a scanned file
whose mtime is at least ``quiet_s`` old is delivered at once; a younger one may still be
mid-copy by a writer that started before us, so it waits: its close event delivers it
(write activity on it cancels the fallback), and if no event comes at all (it was closed
before we started watching) the quiet-period check delivers it. The one gap: a writer that
pauses for longer than ``quiet_s`` without writing, while we have seen no write from it,
can get its file delivered early; its close later delivers it again, and the daemon
re-checks files anyway.

``on_ready`` may be called more than once for the same path (a rescan finds every file that
is still in the inbox, a copier that closes and reopens fires several closes); the
daemon's queue deduplicates.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from segd.config import WatchConfig

log = logging.getLogger(__name__)

Mode = Literal["inotify", "polling"]

# How long `stop()` waits for each thread. Every thread here wakes on an event or a pipe, so
# this is a safety bound, not the expected time.
_JOIN_TIMEOUT_S = 2.0
# The inbox health check (deleted, replaced, observer dead) runs at least this often, even
# when periodic rescans are off or rare: it is one stat() and one look at thread liveness.
_HEALTH_INTERVAL_S = 5.0
# A vanished inbox is recreated only after it stayed missing this long; the observer
# reporting the deletion brings the check forward to this delay.
_DELETED_GRACE_S = 1.0

# What the inotify observer is asked for. Leaving out FileOpenedEvent and
# FileClosedNoWriteEvent keeps IN_OPEN/IN_CLOSE_NOWRITE out of the kernel mask: the daemon
# reading a file must not produce events about it. Created/modified are needed only to
# cancel the quiet-period fallback for scanned files that turn out to be still written.
_INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileMovedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


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
    for path, _st in _scan(inbox, recursive=recursive, patterns=patterns):
        yield path


def _scan(
    inbox: Path, *, recursive: bool, patterns: Sequence[str]
) -> list[tuple[Path, os.stat_result]]:
    found: list[tuple[Path, os.stat_result]] = []
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
                found.append((Path(entry.path), st))
            elif stat.S_ISDIR(st.st_mode) and recursive:
                pending_dirs.append(Path(entry.path))
    found.sort(key=lambda item: (item[1].st_mtime_ns, str(item[0])))
    return found


@dataclass
class _Pending:
    """A file waiting out its quiet period."""

    signature: tuple[int, int, int] | None  # (size, mtime_ns, inode); None = not stat'ed yet
    stable_since: float  # time.monotonic() of the first observation of `signature`


class _Handler(FileSystemEventHandler):
    """Forwards every event to the watcher; runs on watchdog's dispatcher thread."""

    def __init__(self, watcher: InboxWatcher) -> None:
        self._watcher = watcher

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(event)
        except Exception:
            # An exception here would kill watchdog's dispatcher thread and, with it, all
            # further events; the health check would restart it, but losing events is worse.
            log.exception("error handling %r", event)


class InboxWatcher:
    """Watches one inbox folder and reports complete files to ``on_ready``."""

    def __init__(self, inbox: Path, cfg: WatchConfig, on_ready: Callable[[Path], None]) -> None:
        # Deliveries are always spelled under the configured path, even when it is a symlink
        # to the real folder (see `_root`).
        self._inbox = Path(os.path.abspath(inbox))
        self._cfg = cfg
        self._on_ready = on_ready
        # inotify exists only on Linux; elsewhere polling is the portable fallback.
        linux = sys.platform.startswith("linux")
        self._mode: Mode = "inotify" if linux and not cfg.polling else "polling"
        self._tick_s = min(max(cfg.quiet_s / 4, 0.05), 0.5)
        self._health_interval_s = (
            min(cfg.rescan_interval_s, _HEALTH_INTERVAL_S)
            if cfg.rescan_interval_s > 0
            else _HEALTH_INTERVAL_S
        )

        self._lock = threading.Lock()  # guards _pending, _subtrees, _health_due
        self._pending: dict[Path, _Pending] = {}
        self._subtrees: list[Path] = []  # new folders to scan (recursive inotify mode)
        self._health_due = 0.0

        # Guards the observer swap so that stop() and a health-check restart cannot interleave.
        self._observer_lock = threading.Lock()
        self._observer: BaseObserver | None = None
        self._root = self._inbox  # the resolved folder actually watched
        self._root_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the inbox at watch time
        self._missing_logged = False
        self._missing_since: float | None = None  # monotonic time the inbox was first missed

        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._ticker: threading.Thread | None = None

    @property
    def mode(self) -> str:
        """``"inotify"`` or ``"polling"``; polling also when inotify cannot start."""
        return self._mode

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching, then deliver what is already in the inbox (on the calling thread)."""
        if self._ticker is not None:
            raise RuntimeError("InboxWatcher already started")
        self._stopping.clear()
        self._wake.clear()
        if not self._inbox.is_dir():
            log.info("creating inbox %s", self._inbox)
            self._inbox.mkdir(parents=True, exist_ok=True)
        with self._observer_lock:
            self._start_observer()
        log.info("watching %s (%s, recursive=%s)", self._inbox, self._mode, self._cfg.recursive)
        # The scan comes after the observer is running, so nothing falls between the two.
        self.rescan()
        self._health_due = time.monotonic() + self._health_interval_s
        self._ticker = threading.Thread(target=self._run_ticker, name="segd-watch", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        """Stop the observer and the timer thread and wait for both to end."""
        self._stopping.set()
        self._wake.set()
        ticker, self._ticker = self._ticker, None
        # The ticker goes first: it may be restarting the observer right now.
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(_JOIN_TIMEOUT_S)
            if ticker.is_alive():
                log.warning("watch timer thread did not stop within %.1f s", _JOIN_TIMEOUT_S)
        with self._observer_lock:
            self._stop_observer()
        with self._lock:
            self._pending.clear()
            self._subtrees.clear()

    def rescan(self) -> None:
        """Scan the whole inbox and deliver (or start the quiet period for) every candidate."""
        try:
            entries = _scan(self._inbox, recursive=self._cfg.recursive, patterns=self._cfg.ignore)
        except FileNotFoundError:
            # The health check recreates a missing inbox (and logs it) and scans again after.
            log.debug("inbox %s is missing, nothing to scan", self._inbox)
            return
        except OSError as exc:
            log.warning("cannot scan inbox %s: %s", self._inbox, exc)
            return
        self._consider_scanned(entries)

    # -- the observer ----------------------------------------------------------------------

    def _start_observer(self) -> None:
        """Create, schedule and start an observer for the current inbox. Needs _observer_lock."""
        root = Path(os.path.realpath(self._inbox))
        st = os.stat(root)
        self._root = root
        self._root_id = (st.st_dev, st.st_ino)
        if self._mode == "inotify":
            try:
                self._observer = self._make_inotify_observer(root)
                return
            except (OSError, ImportError) as exc:
                # ENOSPC (watch limit) or EMFILE (instance limit), or no inotify at all.
                log.warning("inotify unavailable for %s (%s); falling back to polling", root, exc)
                self._mode = "polling"
        observer = PollingObserverVFS(
            stat=os.lstat, listdir=os.scandir, polling_interval=self._cfg.poll_interval_s
        )
        # lstat, not stat: a symlinked subfolder must look like a link, not a folder to walk.
        observer.schedule(_Handler(self), str(root), recursive=self._cfg.recursive)
        observer.start()
        self._observer = observer

    def _make_inotify_observer(self, root: Path) -> BaseObserver:
        from watchdog.observers.inotify import InotifyObserver

        # Full events: a rename into the inbox from an unwatched place arrives as
        # FileMovedEvent("", dest) instead of a FileCreatedEvent we could not tell from a
        # fresh, still empty file; a move out arrives as FileMovedEvent(src, "").
        observer = InotifyObserver(generate_full_events=True)
        try:
            observer.schedule(
                _Handler(self),
                str(root),
                recursive=self._cfg.recursive,
                event_filter=_INOTIFY_EVENTS,
                follow_symlink=False,
            )
            observer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                observer.stop()
            raise
        return observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        if observer is not threading.current_thread():
            observer.join(_JOIN_TIMEOUT_S)
            if observer.is_alive():
                log.warning("watch observer did not stop within %.1f s", _JOIN_TIMEOUT_S)

    def _observer_healthy(self) -> bool:
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        # An emitter stops itself when the watched folder is deleted while the observer
        # thread stays alive, so the observer alone says nothing.
        emitters = list(observer.emitters)
        return bool(emitters) and all(e.is_alive() for e in emitters)

    def _check_health(self) -> None:
        """Restart the observer if the inbox vanished, was replaced, or the observer died."""
        try:
            st = os.stat(self._inbox)
        except FileNotFoundError:
            # Recreate only once it has been missing for a grace period: someone running
            # `rm -r inbox && mkdir inbox` should not have their mkdir fail because of us.
            now = time.monotonic()
            if self._missing_since is None:
                self._missing_since = now
            if now - self._missing_since < _DELETED_GRACE_S:
                with self._lock:
                    self._health_due = min(self._health_due, self._missing_since + _DELETED_GRACE_S)
                return
            try:
                # parents=False: if the parent is gone too, this is likely an unmounted share,
                # and creating folders under its mount point would hide the real inbox.
                self._inbox.mkdir()
            except OSError as exc:
                if not self._missing_logged:
                    log.error("inbox %s is missing and cannot be recreated: %s", self._inbox, exc)
                    self._missing_logged = True
                return
            log.warning("inbox %s was missing; recreated it", self._inbox)
            st = os.stat(self._inbox)
        except OSError as exc:
            if not self._missing_logged:
                log.error("cannot stat inbox %s: %s", self._inbox, exc)
                self._missing_logged = True
            return
        if not stat.S_ISDIR(st.st_mode):
            if not self._missing_logged:
                log.error("inbox %s is not a folder", self._inbox)
                self._missing_logged = True
            return
        self._missing_logged = False
        self._missing_since = None
        replaced = (st.st_dev, st.st_ino) != self._root_id
        if not replaced and self._observer_healthy():
            return
        reason = "was replaced" if replaced else "lost its observer"
        log.warning("inbox %s %s; restarting the watch", self._inbox, reason)
        with self._observer_lock:
            if self._stopping.is_set():
                return
            self._stop_observer()
            with self._lock:
                self._pending.clear()
            try:
                self._start_observer()
            except OSError as exc:
                log.error("cannot watch inbox %s: %s; will retry", self._inbox, exc)
                return
        # Whatever arrived while nobody was watching.
        self.rescan()

    # -- events (watchdog's dispatcher thread: keep it cheap) --------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._on_dir_event(event)
            return
        src = self._inbox_path(event.src_path) if event.src_path else None
        if isinstance(event, FileMovedEvent):
            if src is not None:
                self._forget(src)
            dest = self._inbox_path(event.dest_path) if event.dest_path else None
            if dest is None:
                return  # moved out of the inbox, or to an ignored / out-of-scope name
            if self._mode == "inotify":
                self._deliver(dest)
            else:
                self._track(dest)
            return
        if src is None:
            return
        if isinstance(event, FileDeletedEvent):
            self._forget(src)
        elif self._mode == "polling":
            if isinstance(event, FileCreatedEvent | FileModifiedEvent):
                self._track(src)
        elif isinstance(event, FileClosedEvent):
            self._deliver(src)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            # A writer is active: its close will deliver the file, so a scan's quiet-period
            # fallback for it must not fire mid-write.
            self._forget(src)
            if isinstance(event, FileCreatedEvent) and not event.is_synthetic:
                # A symlink is complete when created and gets no close event.
                with contextlib.suppress(OSError):
                    if stat.S_ISLNK(os.lstat(event.src_path).st_mode):
                        self._deliver(src)

    def _on_dir_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, DirDeletedEvent) and os.path.normpath(event.src_path) == str(
            self._root
        ):
            # The grace period starts now; the check after it recreates the folder if nobody
            # else did, and restarts the watch either way.
            now = time.monotonic()
            with self._lock:
                if self._missing_since is None:
                    self._missing_since = now
                self._health_due = min(self._health_due, now + _DELETED_GRACE_S)
            return
        if self._mode != "inotify" or not self._cfg.recursive:
            return  # polling snapshots report the files of a new folder one by one
        if isinstance(event, DirCreatedEvent):
            target = self._inbox_path(event.src_path)
        elif isinstance(event, DirMovedEvent) and event.dest_path:
            target = self._inbox_path(event.dest_path)
        else:
            return
        if target is not None:
            # Files that landed in a new folder before its watch existed (cp -r) or that
            # arrived with a folder moved in have no close event of their own: scan the
            # folder on the timer thread, not here.
            with self._lock:
                self._subtrees.append(target)
            self._wake.set()

    def _inbox_path(self, raw: str | bytes) -> Path | None:
        """The configured-inbox spelling of an event path, or None when out of scope/ignored."""
        rel = os.path.relpath(os.fsdecode(raw), self._root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return None
        parts = Path(rel).parts
        if len(parts) > 1 and not self._cfg.recursive:
            return None
        if any(is_ignored(part, self._cfg.ignore) for part in parts):
            return None
        return self._inbox.joinpath(*parts)

    # -- delivery and the quiet period ----------------------------------------------------

    def _deliver(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)
        log.debug("ready: %s", path)
        try:
            self._on_ready(path)
        except Exception:
            # Runs on watchdog's or our own thread; an escaping exception would kill it.
            log.exception("on_ready failed for %s", path)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)

    def _track(self, path: Path, signature: tuple[int, int, int] | None = None) -> None:
        """Start the quiet period for `path` unless it is already running."""
        with self._lock:
            if path not in self._pending:
                self._pending[path] = _Pending(signature, time.monotonic())

    def _consider_scanned(self, entries: list[tuple[Path, os.stat_result]]) -> None:
        now_ns = time.time_ns()
        quiet_ns = int(self._cfg.quiet_s * 1e9)
        for path, st in entries:
            signature = (st.st_size, st.st_mtime_ns, st.st_ino)
            if self._mode == "inotify" and now_ns - st.st_mtime_ns >= quiet_ns:
                self._deliver(path)
            else:
                # A future mtime (clock skew) counts as recent: the quiet period decides.
                self._track(path, signature)

    def _check_quiet(self) -> None:
        with self._lock:
            snapshot = list(self._pending.items())
        if not snapshot:
            return
        now = time.monotonic()
        ready: list[Path] = []
        for path, entry in snapshot:
            try:
                st = os.lstat(path)
            except OSError:
                self._forget(path)
                continue
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                self._forget(path)
                continue
            signature = (st.st_size, st.st_mtime_ns, st.st_ino)
            with self._lock:
                current = self._pending.get(path)
                if current is not entry:
                    continue  # delivered or forgotten meanwhile
                if signature != entry.signature:
                    self._pending[path] = _Pending(signature, now)
                elif now - entry.stable_since >= self._cfg.quiet_s:
                    ready.append(path)
        for path in ready:
            self._deliver(path)

    # -- the timer thread -----------------------------------------------------------------

    def _run_ticker(self) -> None:
        interval = self._cfg.rescan_interval_s
        next_rescan = time.monotonic() + interval if interval > 0 else float("inf")
        while not self._stopping.is_set():
            self._wake.wait(self._tick_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._scan_subtrees()
                self._check_quiet()
                now = time.monotonic()
                with self._lock:
                    health_due = self._health_due <= now
                    if health_due:
                        self._health_due = now + self._health_interval_s
                if health_due:
                    self._check_health()
                if now >= next_rescan:
                    next_rescan = now + interval
                    self.rescan()
            except Exception:
                log.exception("error in the inbox watch timer")

    def _scan_subtrees(self) -> None:
        with self._lock:
            folders, self._subtrees = self._subtrees, []
        for folder in folders:
            try:
                entries = _scan(folder, recursive=True, patterns=self._cfg.ignore)
            except OSError:
                continue  # gone again
            self._consider_scanned(entries)
