"""Progress on stderr: a tqdm bar on a terminal, a plain line every few seconds elsewhere.

On a terminal, log records are routed through the bar (tqdm's logging redirect) so a
warning prints above it instead of tearing it. Elsewhere (journald, CI, a pipe) a redrawn
bar would fill the log with carriage returns, so a line with the same figures (tqdm's
own meter: count, rate, ETA) is written every `LOG_INTERVAL_S` and at the end.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

LOG_INTERVAL_S = 5.0


class Progress:
    def __init__(self, total: int, label: str, stream: TextIO | None = None,
                 enabled: bool = True, unit: str = "img") -> None:
        self.total = total
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.unit = unit
        self.done = 0
        self.failed = 0
        self._started = time.monotonic()
        self._last_line = self._started
        self._bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()
        if enabled and self.stream.isatty():
            self._bar = tqdm(total=total, desc=label, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=True)
            self._redirect.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        if self._bar is not None:
            if failed:
                self._bar.set_postfix_str(f"{self.failed} unreadable", refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self._last_line >= LOG_INTERVAL_S or self.done >= self.total):
            self._last_line = now
            self.stream.write(self.line(now - self._started) + "\n")
            self.stream.flush()

    def line(self, elapsed: float) -> str:
        """The plain-text form: tqdm's meter, plus the unreadable count."""
        meter = tqdm.format_meter(self.done, self.total, elapsed, prefix=self.label,
                                  unit=self.unit, ncols=0)
        return meter + (f", {self.failed} unreadable" if self.failed else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()
