"""A deduplicating FIFO of inbox paths: a path waits at most once, and is not queued again
while it is being processed (the watcher reports the same file several times by design)."""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path


class WorkQueue:
    def __init__(self) -> None:
        self._items: deque[Path] = deque()
        self._known: set[Path] = set()  # queued or in flight
        self._cond = threading.Condition()
        self._closed = False

    def put(self, path: Path) -> bool:
        with self._cond:
            if self._closed or path in self._known:
                return False
            self._known.add(path)
            self._items.append(path)
            self._cond.notify()
            return True

    def get(self, timeout: float | None) -> Path | None:
        """The next path, or None on timeout or once closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def done(self, path: Path) -> None:
        with self._cond:
            self._known.discard(path)

    def close(self) -> None:
        """Refuse new paths and drop the queued ones (they stay in the inbox for the next
        start); `get` then returns None. Paths already in flight are finished by the caller."""
        with self._cond:
            self._closed = True
            for path in self._items:
                self._known.discard(path)
            self._items.clear()
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
