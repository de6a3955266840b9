"""A deduplicating FIFO of inbox paths: a path waits at most once, and is not queued again
while it is being processed (the watcher reports the same file several times by design).
A path reported again while it is being processed is queued once more when it is done: the
report may be about a newer file under that name (replaced or rewritten meanwhile), and no
other event may come for it."""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path


class WorkQueue:
    def __init__(self) -> None:
        self._items: deque[Path] = deque()
        self._known: set[Path] = set()  # queued or in flight
        self._queued: set[Path] = set()
        self._again: set[Path] = set()  # reported again while in flight
        self._cond = threading.Condition()
        self._closed = False

    def put(self, path: Path) -> bool:
        with self._cond:
            if self._closed:
                return False
            if path in self._known:
                if path not in self._queued:
                    self._again.add(path)
                return False
            self._known.add(path)
            self._queued.add(path)
            self._items.append(path)
            self._cond.notify()
            return True

    def get(self, timeout: float | None) -> Path | None:
        """The next path, or None on timeout or once closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            if not self._items:
                return None
            path = self._items.popleft()
            self._queued.discard(path)
            return path

    def done(self, path: Path) -> None:
        with self._cond:
            if path in self._again:
                self._again.discard(path)
                if not self._closed:
                    self._queued.add(path)
                    self._items.append(path)
                    self._cond.notify()
                    return
            self._known.discard(path)

    def close(self) -> None:
        """Refuse new paths and drop the queued ones (they stay in the inbox for the next
        start); `get` then returns None. Paths already in flight are finished by the caller."""
        with self._cond:
            self._closed = True
            for path in self._items:
                self._known.discard(path)
            self._items.clear()
            self._queued.clear()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._known) - len(self._items)
