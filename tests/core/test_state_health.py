"""Which failures mean the state folder cannot take commits, and the pause around them.
The SQLite errors are real ones (a page limit reached, a read-only connection written)."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

import pytest

from segd.core.errors import StoreError
from segd.core.state_health import StatePause, StateUnavailable, classify, space_verdict

STATE = Path("/srv/segd/state")


def _full_error(tmp_path: Path) -> sqlite3.Error:
    conn = sqlite3.connect(tmp_path / "full.db", isolation_level=None)
    conn.execute("CREATE TABLE t(x BLOB)")
    conn.execute("PRAGMA max_page_count = 3")  # the database may not grow: SQLITE_FULL
    try:
        with pytest.raises(sqlite3.Error) as caught:
            for _ in range(10):
                conn.execute("INSERT INTO t VALUES (?)", (b"x" * 8192,))
    finally:
        conn.close()
    return caught.value


def _readonly_error(tmp_path: Path) -> sqlite3.Error:
    path = tmp_path / "ro.db"
    sqlite3.connect(path).execute("CREATE TABLE t(x)").connection.close()
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.Error) as caught:
            conn.execute("INSERT INTO t VALUES (1)")
    finally:
        conn.close()
    return caught.value


def test_real_sqlite_full_and_read_only(tmp_path: Path) -> None:
    full = classify(_full_error(tmp_path), STATE)
    assert full is not None and full.kind == "full", full
    assert "full" in full.detail
    ro = classify(_readonly_error(tmp_path), STATE)
    assert ro is not None and ro.kind == "read-only", ro
    assert "readonly" in ro.detail


def test_the_cause_behind_a_store_error(tmp_path: Path) -> None:
    """The store wraps SQLite's errors (db.py): the cause decides."""
    try:
        try:
            raise _full_error(tmp_path)
        except sqlite3.Error as exc:
            raise StoreError(f"{STATE}/segd.db: commit: {exc}") from exc
    except StoreError as wrapped:
        found = classify(wrapped, STATE)
    assert found is not None and found.kind == "full"


@pytest.mark.parametrize(("message", "kind"), [
    ("database or disk is full", "full"),
    ("attempt to write a readonly database", "read-only"),
    ("disk I/O error", "failing"),
])
def test_sqlite_messages_without_a_code(message: str, kind: str) -> None:
    assert classify(sqlite3.OperationalError(message), STATE) == StateUnavailable(kind, message)


def test_other_sqlite_errors_are_not_the_folder() -> None:
    assert classify(sqlite3.IntegrityError("UNIQUE constraint failed: images.path"),
                    STATE) is None
    assert classify(sqlite3.OperationalError("no such table: images"), STATE) is None


@pytest.mark.parametrize(("code", "kind"), [
    (errno.ENOSPC, "full"), (errno.EDQUOT, "full"), (errno.EROFS, "read-only"),
    (errno.EIO, "failing"), (errno.EACCES, "not writable"),
])
def test_os_errors_on_state_files(code: int, kind: str) -> None:
    exc = OSError(code, os.strerror(code), str(STATE / "segd.db-wal"))
    assert classify(exc, STATE) == StateUnavailable(kind, os.strerror(code))  # type: ignore[arg-type]


def test_os_errors_elsewhere_are_not_the_folder() -> None:
    """A full or read-only library, or an error naming no file, is not the state folder's."""
    for name in ("/srv/segd/library/cluster-01/a.jpg", "/srv/segd/state-other/x", None):
        assert classify(OSError(errno.ENOSPC, "No space left on device", name), STATE) is None
    # An error naming two files (a rename): the second is in the state folder.
    exc = OSError(errno.EROFS, "Read-only file system", "/elsewhere/a", None,
                  str(STATE / "b"))
    assert classify(exc, STATE) is not None
    assert classify(ValueError("not an OSError"), STATE) is None


def test_pause_begins_once_probes_and_resumes() -> None:
    full = StateUnavailable("full", "database or disk is full")
    pause = StatePause(probe_every_s=2.0)
    assert not pause.paused and not pause.probe_due(100.0)
    assert pause.resume(100.0) == 0.0  # nothing to resume
    assert pause.pause(full, 10.0)  # the failure that begins it: said once
    assert not pause.pause(StateUnavailable("read-only", "x"), 10.5)  # later ones: not
    assert pause.reason == full and pause.since == 10.0
    assert not pause.probe_due(11.9) and pause.probe_due(12.0)
    ro = StateUnavailable("read-only", "Read-only file system")
    pause.probe_failed(ro, 12.0)  # still unavailable, for another reason now
    assert pause.reason == ro and not pause.probe_due(13.9) and pause.probe_due(14.0)
    assert pause.resume(15.5) == 5.5
    assert not pause.paused and not pause.probe_due(100.0)
    assert pause.pause(full, 20.0)  # a new pause is said again


def test_describe_names_the_folder() -> None:
    text = StateUnavailable("full", "database or disk is full").describe(STATE)
    assert text == f"the state folder {STATE} is full (database or disk is full)"


def test_space_verdict() -> None:
    assert space_verdict(False, 2 << 20, 1 << 20) is None
    full = space_verdict(False, 4096, 1 << 20)
    assert full is not None and full.kind == "full" and "4096 bytes free" in full.detail
    ro = space_verdict(True, 2 << 20, 1 << 20)
    assert ro is not None and ro.kind == "read-only"
