"""inotify's limits: why a watch failed and what to raise, and an observer that reports every
folder it could not watch (watchdog itself skips such sub-folders silently)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver


def sysctl_text(name: str) -> str:
    """``fs.inotify.NAME = VALUE`` for a log line, without the value if it cannot be read,
    plus the user namespace's own lower limit where there is one (containers)."""
    text = f"fs.inotify.{name}"
    host = _read_limit(Path("/proc/sys/fs/inotify") / name)
    if host is not None:
        text += f" = {host}"
    # user.max_inotify_{watches,instances}: the copy that applies in this user namespace.
    own = _read_limit(Path("/proc/sys/user") / name.replace("max_user_", "max_inotify_"))
    if own is not None and host is not None and own < host:
        text += f", {own} in this user namespace"
    return text


def _read_limit(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def inotify_failure(root: Path, exc: BaseException) -> str:
    """Why the inbox cannot be watched with inotify, and what to do about it."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code == errno.ENOSPC:
        return (
            f"inotify watch limit reached watching {root} ({sysctl_text('max_user_watches')}); "
            "polling the whole inbox instead. To use inotify, raise the limit "
            "(sysctl -w fs.inotify.max_user_watches=..., kept in /etc/sysctl.d/) and restart"
        )
    if code == errno.EMFILE:
        return (
            f"inotify instance limit reached watching {root} ({sysctl_text('max_user_instances')});"
            " polling the whole inbox instead. To use inotify, raise the limit "
            "(sysctl -w fs.inotify.max_user_instances=..., kept in /etc/sysctl.d/) and restart"
        )
    return f"inotify unavailable for {root} ({exc}); falling back to polling"


def reporting_inotify_observer(on_unwatched: Callable[[bytes], None]) -> BaseObserver:
    """An inotify observer that calls ``on_unwatched(folder)`` for each folder that gets no
    watch because the watch limit is reached (watchdog itself skips such sub-folders
    silently)."""
    from watchdog.observers.inotify import InotifyFullEmitter
    from watchdog.observers.inotify_c import (
        CallbackId,
        InotifyFD,
        Mask,
        WatchCallback,
        WatchDescriptor,
    )

    class ReportingInotifyFD(InotifyFD):
        def add_callback(
            self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
        ) -> WatchDescriptor:
            try:
                return super().add_callback(path, mask, callback, id_)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    on_unwatched(path)
                raise

    class Observer(BaseObserver):
        """watchdog's InotifyObserver, on the inotify instance above."""

        def __init__(self) -> None:
            self._fd = ReportingInotifyFD()
            self._fd.start()
            # Full events: a rename into the inbox from an unwatched place arrives as
            # FileMovedEvent("", dest) instead of a FileCreatedEvent we could not tell from
            # a fresh, still empty file; a move out arrives as FileMovedEvent(src, "").
            super().__init__(
                InotifyFullEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._fd
            )

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self._fd.stop()
            self._fd.join()

    return Observer()
