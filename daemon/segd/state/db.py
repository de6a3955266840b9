"""The connection owner: opening, configuring and migrating the state database, then
transactions, snapshots and error translation for the table classes (see ``store``)."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Self

import numpy as np

from segd.core.errors import StoreError
from segd.state import fsops
from segd.state.schema import EMBEDDING_DIM, META_DIM, META_MODEL, check_version, migrate, read_dim

BUSY_TIMEOUT_MS: Final = 10_000
FILE_MODE: Final = 0o600

EMB_DTYPE: Final = np.dtype("<f4")  # on-disk byte order is fixed, whatever the host's


class Database:
    """The one owner of the connection: its lock, transactions, snapshots, meta and the
    embedding encoding. The table classes build on it; ``Store`` combines them."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool, dim: int) -> None:
        self.path = path
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = conn
        self._dim = dim
        self._lock = threading.RLock()
        self._depth = 0  # nesting level of transaction(); 0 = autocommit
        self._in_snapshot = False

    # ---- lifecycle

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> Self:
        """Open (creating and migrating when writable) the state database at ``path``.

        ``path`` is the database file itself (``<state dir>/segd.db``). ``readonly=True`` is for
        ``segd status`` while the daemon runs: it never creates, migrates or chmods anything and
        refuses a database that still needs migrating.
        """
        path = Path(path).absolute()
        if readonly:
            if not path.is_file():
                raise StoreError(f"{path}: no state database (has the daemon run yet?)")
            uri = f"{path.as_uri()}?mode=ro"
        else:
            _precreate(path)
            uri = f"{path.as_uri()}?mode=rwc"
        try:
            # isolation_level=None: the sqlite3 module must not open transactions behind our back;
            # every transaction here is explicit so its extent is visible in the code.
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot open state database: {e}") from e
        try:
            _configure(conn, readonly=readonly)
            version = check_version(conn, path, readonly=readonly)
            if not readonly:
                migrate(conn, path, version)
                _tighten_modes(path)
            dim = read_dim(conn)
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"{path}: cannot open state database: {e}") from e
        except BaseException:
            conn.close()
            raise
        return cls(conn, path, readonly=readonly, dim=dim)

    @property
    def dim(self) -> int:
        """Embedding length this database holds (meta ``embedding_dim``, default 1280)."""
        return self._dim

    def close(self) -> None:
        with self._lock:
            if self._conn is None:
                return
            if self._depth or self._in_snapshot:
                raise StoreError("close() inside an open transaction or snapshot")
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_transaction(self) -> bool:
        return self._depth > 0

    @contextmanager
    def _guard(self, what: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and turn SQLite's exceptions into StoreError naming the operation."""
        with self._lock:
            if self._conn is None:
                raise StoreError(f"{self.path}: store is closed")
            try:
                yield self._conn
            except sqlite3.IntegrityError as e:
                raise StoreError(f"{what}: constraint violated: {e}") from e
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: {what}: {e}") from e

    @contextmanager
    def transaction(self) -> Iterator[Self]:
        """Group writes: all of them commit together or none does.

        Nested blocks become savepoints, so an inner failure that the caller catches undoes
        only the inner block. The outer block starts with BEGIN IMMEDIATE: it takes the write
        lock up front, because a deferred transaction that reads first and then writes can hit
        SQLITE_BUSY on the upgrade, which busy_timeout cannot resolve.
        """
        if self.readonly:
            raise StoreError(f"{self.path}: store was opened read-only")
        with self._lock:
            if self._in_snapshot:
                # The snapshot ends in ROLLBACK: a write inside it would silently vanish.
                raise StoreError("write inside snapshot(): use transaction() instead")
            depth = self._depth
            with self._guard("begin transaction") as conn:
                conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT sp{depth}")
            self._depth = depth + 1
            try:
                yield self
            except BaseException:
                self._depth = depth
                with self._guard("rollback") as conn:
                    if depth == 0:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                    else:
                        conn.execute(f"ROLLBACK TO sp{depth}")
                        conn.execute(f"RELEASE sp{depth}")
                raise
            self._depth = depth
            with self._guard("commit") as conn:
                try:
                    conn.execute("COMMIT" if depth == 0 else f"RELEASE sp{depth}")
                except sqlite3.Error:
                    if depth == 0 and conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    @contextmanager
    def snapshot(self) -> Iterator[Self]:
        """Read several things from one consistent state (works on read-only stores).

        ``segd status`` uses this so counts, clusters and the last fit agree with each other
        even while the daemon commits between the reads. Inside a transaction() it is a no-op.
        """
        with self._lock:
            if self._depth or self._in_snapshot:
                yield self
                return
            with self._guard("begin snapshot") as conn:
                conn.execute("BEGIN DEFERRED")
                # A deferred transaction takes its snapshot at the first read: take it now.
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
            self._in_snapshot = True
            try:
                yield self
            finally:
                self._in_snapshot = False
                with self._guard("end snapshot") as conn:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write: a transaction (or savepoint) around error translation.

        The order matters: the guard turns a SQLite error into StoreError first, and that
        StoreError then passes through transaction(), which rolls back.
        """
        with self.transaction(), self._guard(what) as conn:
            yield conn

    # ---- meta

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._guard(f"read meta {key!r}") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._write(f"set meta {key!r}") as conn:
            conn.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, str(value)),
            )

    def bind_model(self, model_sha256: str, dim: int) -> None:
        """Record which model produced the embeddings, or refuse a different one.

        Distances between embeddings of two models mean nothing, so a database is tied to the
        first model that wrote to it. Call it at daemon start, after loading the model.
        """
        with self._write("bind model") as conn:
            rows = dict(
                conn.execute(
                    "SELECT key, value FROM meta WHERE key IN (?, ?)", (META_MODEL, META_DIM)
                ).fetchall()
            )
            old_sha, old_dim = rows.get(META_MODEL), rows.get(META_DIM)
            if old_sha is None:
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?), (?, ?)",
                    (META_MODEL, model_sha256, META_DIM, str(int(dim))),
                )
                self._dim = int(dim)
                return
            if old_sha != model_sha256 or int(old_dim or EMBEDDING_DIM) != int(dim):
                raise StoreError(
                    f"{self.path}: state database holds embeddings of model {old_sha[:12]} "
                    f"(dim {old_dim}); the loaded model is {model_sha256[:12]} (dim {dim}). "
                    "Embeddings of different models cannot be mixed"
                )

    # ---- embeddings <-> blobs

    def _to_blob(self, emb: Any, what: str) -> bytes:
        arr = np.asarray(emb, dtype=EMB_DTYPE)
        if arr.ndim != 1 or arr.shape[0] != self._dim:
            raise StoreError(f"{what}: embedding has shape {arr.shape}, expected ({self._dim},)")
        return arr.tobytes()

    def _from_blob(self, blob: bytes | None, what: str) -> np.ndarray | None:
        if blob is None:
            return None
        if len(blob) != 4 * self._dim:
            raise StoreError(
                f"{self.path}: {what}: stored vector has {len(blob)} bytes, expected "
                f"{4 * self._dim} ({self._dim} float32); the database is damaged"
            )
        return np.frombuffer(blob, dtype=EMB_DTYPE).astype(np.float32, copy=False)

    # ---- maintenance

    def integrity_check(self) -> str:
        """SQLite's own consistency check; "ok" when the file is sound."""
        with self._guard("integrity check") as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)


# --------------------------------------------------------------------------- opening


def _precreate(path: Path) -> None:
    # Create the file ourselves with 0600 before SQLite sees it: SQLite then creates -wal and
    # -shm with the main file's permission bits. Doing it with os.open instead of changing the
    # umask keeps other threads' file creation unaffected (umask is process-wide).
    try:
        fsops.make_dirs(path.parent, 0o700)  # durable: it will hold the journal
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot create state directory: {e}") from e
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    except OSError as e:
        raise StoreError(f"{path}: cannot create state database: {e}") from e
    os.close(fd)


def _tighten_modes(path: Path) -> None:
    # A database created by an older build, restored from a backup or copied around may be
    # group/world readable; it lists every photo path, so bring it back to 0600.
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            if stat.S_IMODE(p.stat().st_mode) != FILE_MODE:
                p.chmod(FILE_MODE)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise StoreError(f"{p}: cannot set mode 0600: {e}") from e


def _configure(conn: sqlite3.Connection, *, readonly: bool) -> None:
    # busy_timeout first: every later statement, including the journal_mode switch, may have to
    # wait for another process (a second opener migrating, a checkpoint) instead of failing.
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        return
    # WAL: readers in other processes see the last commit and never block the writer.
    # The mode is persistent in the file; setting it on every open is a cheap no-op.
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(f"cannot switch the state database to WAL mode (got {mode!r})")
    # FULL, not WAL's usual NORMAL. Against a killed process both are safe: committed pages
    # are in the OS page cache. Against power loss or a kernel crash NORMAL may lose the last
    # commits, because it syncs the WAL only at checkpoints. That is tolerable for counters
    # but not for the move journal: begin_move's row must be on stable storage before the
    # file is renamed, or after a power cut a moved file has no trace of where it went.
    # FULL fsyncs the WAL at each commit; writes here are few and small, so it costs little.
    conn.execute("PRAGMA synchronous = FULL")


# --------------------------------------------------------------------------- encoding


def abs_path(path: Path | str, what: str) -> str | bytes:
    """An absolute path as stored: text, or raw bytes for a name that is not UTF-8."""
    p = Path(path)
    if not p.is_absolute():
        raise StoreError(f"{what}: path {str(p)!r} is not absolute")
    return text_to_db(str(p))


def text_to_db(text: str) -> str | bytes:
    """File names need not be UTF-8 (Linux names are bytes): such a name is stored as the
    raw bytes in a BLOB, which SQLite keeps as is, and read back with os.fsdecode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


def text_from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value
