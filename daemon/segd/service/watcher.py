"""The inbox watcher: filesystem activity in, complete candidate files out.

`InboxWatcher` calls ``on_ready(path)`` for every file in the inbox that looks complete. It
never reports a file merely because it appeared or grew. What counts as complete is decided
by `segd.core.readiness.Readiness` (its docstring has the rules); this module is the
plumbing around it: the watchdog observer, the timer thread, scans, stat calls and the
health of the watch. In short:

* ``inotify`` (Linux, ``watch.polling: false``): ready on a close after writing
  (``FileClosedEvent``) or a rename into the inbox (``FileMovedEvent`` whose destination is
  inside it: a move from elsewhere, or ``foo.jpg.part`` -> ``foo.jpg``). Read-only closes
  and opens are not even requested from the kernel, so the daemon reading a photo cannot
  make it re-deliver itself.
* ``polling`` (NFS, SMB, SSHFS, where inotify sees nothing, or where inotify cannot start):
  watchdog's polling events are only hints; a file is ready once its size, mtime and inode
  stayed the same for ``quiet_s``.

Scans (at start, every ``rescan_interval_s``, after the observer had to be restarted) cover
what events cannot: files present before start and events the kernel dropped. In inotify
mode a scanned file at least ``quiet_s`` old is delivered at once, a younger one waits for
its close or the quiet period. The one gap: a writer that pauses for longer than ``quiet_s``
without writing, while we have seen no write from it, can get its file delivered early; its
close later delivers it again, and the daemon re-checks files anyway.

The inotify watch limit (``fs.inotify.max_user_watches``): in recursive mode every folder
needs a watch. If the inbox itself gets none, the whole inbox is polled. If only some
sub-folders get none (watchdog skips those and carries on), those folders are listed every
``poll_interval_s`` and their files follow the polling rules, while the rest of the inbox
stays on inotify; a polled folder stays polled until the watch is rebuilt. Both cases log a
warning naming the limit and how to raise it.

``on_ready`` may be called more than once for the same path (a rescan finds every file that
is still in the inbox, a copier that closes and reopens fires several closes); the
daemon's queue deduplicates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

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
from segd.core.readiness import Mode, Readiness
from segd.service.inbox_scan import is_ignored, lstat_signature, scan_with_signatures
from segd.service.inotify_limits import (
    inotify_failure,
    reporting_inotify_observer,
    sysctl_text,
)

log = logging.getLogger(__name__)


class StopRaceFilter(logging.Filter):
    """watchdog's inotify emitter, woken from its read by the observer's stop(), may look
    once more and log an ERROR that "the thread is inactive"; it then returns no events,
    as a stopped emitter should. segd stops its observers itself (at shutdown, or to
    rebuild a watch), so that line is no error of the watch: it is logged at DEBUG."""

    MESSAGE = "InotifyEmitter.queue_events() called when the thread is inactive"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR or record.getMessage() != self.MESSAGE:
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger("watchdog.observers.inotify").addFilter(StopRaceFilter())

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
        mode: Mode = "inotify" if linux and not cfg.polling else "polling"
        self._tick_s = min(max(cfg.quiet_s / 4, 0.05), 0.5)
        self._health_interval_s = (
            min(cfg.rescan_interval_s, _HEALTH_INTERVAL_S)
            if cfg.rescan_interval_s > 0
            else _HEALTH_INTERVAL_S
        )

        # Guards _ready, _subtrees, _unwatched, _health_due.
        self._lock = threading.Lock()
        self._ready = Readiness(
            mode=mode, quiet_s=cfg.quiet_s, monotonic=time.monotonic, wall_ns=time.time_ns
        )
        self._subtrees: list[Path] = []  # new folders to scan (recursive inotify mode)
        self._unwatched: list[bytes] = []  # folders the watch limit left out, not yet polled
        self._limit_logged = False
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
        return self._ready.mode

    @property
    def waiting(self) -> frozenset[Path]:
        """The files waiting out their quiet period."""
        with self._lock:
            return self._ready.waiting

    @property
    def unwatched(self) -> frozenset[Path]:
        """Folders that got no inotify watch (the watch limit) and are polled instead."""
        with self._lock:
            return self._ready.polled_folders

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
        log.info("watching %s (%s, recursive=%s)", self._inbox, self.mode, self._cfg.recursive)
        # The scan comes after the observer is running, so nothing falls between the two, and
        # after the unwatched folders are known, so their files get the polling rules.
        self._adopt_unwatched()
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
            self._ready.reset()
            self._subtrees.clear()
            self._unwatched.clear()

    def rescan(self) -> None:
        """Scan the whole inbox and deliver (or start the quiet period for) every candidate."""
        try:
            entries = scan_with_signatures(self._inbox, recursive=self._cfg.recursive,
                                           patterns=self._cfg.ignore)
        except FileNotFoundError:
            # The health check recreates a missing inbox (and logs it) and scans again after.
            log.debug("inbox %s is missing, nothing to scan", self._inbox)
            return
        except OSError as exc:
            log.warning("cannot scan inbox %s: %s", self._inbox, exc)
            return
        with self._lock:
            ready = self._ready.scanned(entries)
        self._deliver(ready)

    # -- the observer ----------------------------------------------------------------------

    def _start_observer(self) -> None:
        """Create, schedule and start an observer for the current inbox. Needs _observer_lock."""
        root = Path(os.path.realpath(self._inbox))
        st = os.stat(root)
        self._root = root
        self._root_id = (st.st_dev, st.st_ino)
        self._limit_logged = False
        if self._ready.mode == "inotify":
            try:
                self._observer = self._makereporting_inotify_observer(root)
                return
            except (OSError, ImportError) as exc:
                # ENOSPC (watch limit) or EMFILE (instance limit), or no inotify at all.
                log.warning("%s", inotify_failure(root, exc))
                with self._lock:
                    self._ready.reset("polling")
                    self._unwatched.clear()
        observer = PollingObserverVFS(
            stat=os.lstat, listdir=os.scandir, polling_interval=self._cfg.poll_interval_s
        )
        # lstat, not stat: a symlinked subfolder must look like a link, not a folder to walk.
        observer.schedule(_Handler(self), str(root), recursive=self._cfg.recursive)
        observer.start()
        self._observer = observer

    def _makereporting_inotify_observer(self, root: Path) -> BaseObserver:
        observer = reporting_inotify_observer(self._on_unwatched)
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
                self._ready.reset()
                self._unwatched.clear()
            try:
                self._start_observer()
            except OSError as exc:
                log.error("cannot watch inbox %s: %s; will retry", self._inbox, exc)
                return
        # Whatever arrived while nobody was watching.
        self._adopt_unwatched()
        self.rescan()

    # -- folders without a watch -----------------------------------------------------------

    def _on_unwatched(self, raw: bytes) -> None:
        """A folder got no watch; called with watchdog's locks held, so only note it."""
        with self._lock:
            self._unwatched.append(raw)
        self._wake.set()

    def _adopt_unwatched(self) -> None:
        """Start polling the folders reported since last time, and say so once."""
        with self._lock:
            reported, self._unwatched = self._unwatched, []
            added = [
                folder
                for folder in (self._inbox_path(raw) for raw in reported)
                if folder is not None and self._ready.poll_folder(folder)
            ]
            total = len(self._ready.polled_folders)
        if not added:
            return
        if self._limit_logged:
            log.info(
                "%d more folder(s) in %s polled (no inotify watch left)", len(added), self._inbox
            )
            return
        self._limit_logged = True
        log.warning(
            "inotify watch limit reached (%s): %d folder(s) in %s got no watch, e.g. %s; "
            "polling them every %.1f s instead. To watch every folder, raise the limit "
            "(sysctl -w fs.inotify.max_user_watches=..., kept in /etc/sysctl.d/) and restart",
            sysctl_text("max_user_watches"),
            total,
            self._inbox,
            added[0],
            self._cfg.poll_interval_s,
        )

    def _poll_unwatched(self) -> None:
        """List every polled folder; new and changed files start their quiet period."""
        with self._lock:
            folders = sorted(self._ready.polled_folders)
        for folder in folders:
            try:
                entries = scan_with_signatures(folder, recursive=True, patterns=self._cfg.ignore)
            except (FileNotFoundError, NotADirectoryError):
                # Gone or moved: if it comes back, watchdog tries a watch again and reports it.
                with self._lock:
                    self._ready.unpoll_folder(folder)
                continue
            except OSError:
                log.debug("cannot list polled folder %s", folder, exc_info=True)
                continue
            with self._lock:
                self._ready.polled(folder, entries)

    # -- events (watchdog's dispatcher thread: keep it cheap) --------------------------------

    def _on_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._on_dir_event(event)
            return
        src = self._inbox_path(event.src_path) if event.src_path else None
        dest = (
            self._inbox_path(event.dest_path)
            if isinstance(event, FileMovedEvent) and event.dest_path
            else None
        )
        # A symlink is complete when created and gets no close event; the stat stays out of
        # the lock.
        symlink = (
            src is not None
            and isinstance(event, FileCreatedEvent)
            and not event.is_synthetic
            and self._ready.mode == "inotify"
            and _is_symlink(event.src_path)
        )
        with self._lock:
            ready = self._feed(event, src, dest, symlink=symlink)
        self._deliver(ready)

    def _feed(
        self, event: FileSystemEvent, src: Path | None, dest: Path | None, *, symlink: bool
    ) -> list[Path]:
        """Feed one file event to the readiness rules. Needs _lock."""
        if isinstance(event, FileMovedEvent):
            if src is not None:
                self._ready.deleted(src)
            # None: moved out of the inbox, or to an ignored / out-of-scope name.
            return self._ready.moved_in(dest) if dest is not None else []
        if src is None:
            return []
        if isinstance(event, FileDeletedEvent):
            self._ready.deleted(src)
            return []
        if isinstance(event, FileClosedEvent):
            return self._ready.closed(src)
        if isinstance(event, FileCreatedEvent | FileModifiedEvent):
            return self._ready.written(src, symlink=symlink)
        return []

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
        if self._ready.mode != "inotify" or not self._cfg.recursive:
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

    def _deliver(self, paths: Iterable[Path]) -> None:
        for path in paths:
            log.debug("ready: %s", path)
            try:
                self._on_ready(path)
            except Exception:
                # Runs on watchdog's or our own thread; an escaping exception would kill it.
                log.exception("on_ready failed for %s", path)

    def _check_quiet(self) -> None:
        with self._lock:
            check = self._ready.begin_check()
        if not check.entries:
            return
        # The stats run without the lock: on a network share each one can take a while.
        observed = {path: lstat_signature(path) for path in check.paths}
        with self._lock:
            ready = self._ready.finish_check(check, observed)
        self._deliver(ready)

    # -- the timer thread -----------------------------------------------------------------

    def _run_ticker(self) -> None:
        interval = self._cfg.rescan_interval_s
        next_rescan = time.monotonic() + interval if interval > 0 else float("inf")
        next_poll = time.monotonic() + self._cfg.poll_interval_s
        while not self._stopping.is_set():
            self._wake.wait(self._tick_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self._adopt_unwatched()
                self._scan_subtrees()
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + self._cfg.poll_interval_s
                    self._poll_unwatched()
                self._check_quiet()
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
                entries = scan_with_signatures(folder, recursive=True, patterns=self._cfg.ignore)
            except OSError:
                continue  # gone again
            with self._lock:
                ready = self._ready.scanned(entries)
            self._deliver(ready)


def _is_symlink(raw: str | bytes) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(raw).st_mode)
    except OSError:
        return False
