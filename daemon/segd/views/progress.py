"""A dependency-free progress bar for stderr: redrawn in place on a terminal, a log line
every few seconds otherwise (so journald and CI logs do not fill with carriage returns)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._tty = self.stream.isatty()

    def advance(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        now = time.perf_counter()
        interval = 0.1 if self._tty else 5.0
        if self.enabled and (now - self._last_draw >= interval or self.done >= self.total):
            self._last_draw = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else 0.0
        frac = self.done / self.total if self.total else 1.0
        extra = f", {self.failed} unreadable" if self.failed else ""
        text = (f"{self.label} {self.done}/{self.total} ({frac:4.0%}) "
                f"{rate:6.1f} img/s, eta {remaining:5.0f}s{extra}")
        if self._tty:
            width = 24
            filled = int(frac * width)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {text}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
