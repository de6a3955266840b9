"""Progress output: a bar on a terminal that log lines do not tear, plain lines elsewhere."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from segd.views.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_output_has_no_carriage_returns_and_ends_with_the_totals() -> None:
    out = io.StringIO()
    with Progress(10, "embedding", stream=out) as progress:
        for _ in range(9):
            progress.advance(1)
        progress.advance(1, failed=1)
    text = out.getvalue()
    assert "\r" not in text
    last = text.splitlines()[-1]
    assert "10/10" in last and "100%" in last and "img/s" in last
    assert last.endswith("1 unreadable")


def test_disabled_progress_writes_nothing() -> None:
    out = FakeTerminal()
    with Progress(3, "embedding", stream=out, enabled=False) as progress:
        progress.advance(3)
    assert out.getvalue() == ""


def test_terminal_bar_is_redrawn_in_place() -> None:
    out = FakeTerminal()
    with Progress(4, "embedding", stream=out) as progress:
        for _ in range(4):
            progress.advance(1)
    text = out.getvalue()
    assert "\r" in text and "4/4" in text


def test_a_log_line_during_the_bar_gets_a_line_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with Progress(4, "embedding", stream=terminal) as progress:
            progress.advance(2)
            logging.getLogger("segd.test").warning("a file changed while read")
            progress.advance(2)
        # Outside the bar's lifetime logging is back to the original handler.
        assert handler in root.handlers
    finally:
        root.removeHandler(handler)
    lines = terminal.getvalue().replace("\r", "\n").splitlines()
    warning = [line for line in lines if "a file changed while read" in line]
    assert warning == ["WARNING a file changed while read"]
