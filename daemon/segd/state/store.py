"""The daemon's memory across restarts: one SQLite file, safe against ``kill -9`` at any instant.

Layout and guarantees
---------------------
* One file, ``segd.db`` in the state directory, in WAL mode. A reader in another process
  (``segd status``) sees the last committed state and never blocks the writer, nor the writer it.
* Every write runs inside ``BEGIN IMMEDIATE ... COMMIT``; a process killed at any instant leaves
  either the whole transaction or nothing of it. ``synchronous=FULL`` adds durability against
  power loss (see ``_configure``).
* The schema is versioned by ``PRAGMA user_version`` and moved forward by ``MIGRATIONS``, one
  transaction per step; a database written by a newer segd is refused rather than guessed at.
* File moves go through a write-ahead journal (the ``moves`` table): ``begin_move`` commits the
  intent before the file is touched, ``finish_move`` deletes the intent and records the result in
  one transaction. After a crash ``pending_moves`` lists exactly the moves whose outcome on disk
  must be checked (see ``begin_move``).

Threading: a ``Store`` owns one connection opened with ``check_same_thread=False`` and guards it
with a re-entrant lock held for each call and for the whole of a ``transaction()`` block, so the
daemon may create it on the main thread and use it from its writer thread, and a second thread
cannot slip statements into another thread's transaction. Iterators take the lock per page only,
so a slow consumer never stalls other threads.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from segd.core.errors import StoreError

DB_NAME: Final = "segd.db"
EMBEDDING_DIM: Final = 1280  # MobileNetV2 pooled features
IMAGE_STATES: Final = ("pending", "sorted", "quarantined")
MOVE_STATES: Final = ("planned", "copied")
# "segd" in ASCII: marks the file as ours so a stray SQLite file is refused, not migrated.
APPLICATION_ID: Final = 0x73656764
BUSY_TIMEOUT_MS: Final = 10_000
FILE_MODE: Final = 0o600

_EMB_DTYPE: Final = np.dtype("<f4")  # on-disk byte order is fixed, whatever the host's
_PAGE_ROWS: Final = 1024  # rows per query when iterating image rows

META_MODEL: Final = "model_sha256"
META_DIM: Final = "embedding_dim"


# --------------------------------------------------------------------------- schema / migrations

Migration = Callable[[sqlite3.Connection], None]


def _m1_initial(conn: sqlite3.Connection) -> None:
    for sql in (
        f"PRAGMA application_id = {APPLICATION_ID}",
        """CREATE TABLE meta (
               key   TEXT PRIMARY KEY,
               value TEXT NOT NULL
           )""",
        # AUTOINCREMENT: a retired cluster's id is never handed out again, so an id seen in a
        # log, a report or an old fit always means the same cluster.
        """CREATE TABLE clusters (
               id         INTEGER PRIMARY KEY AUTOINCREMENT,
               folder     TEXT NOT NULL UNIQUE,
               centroid   BLOB NOT NULL,
               size       INTEGER NOT NULL DEFAULT 0,
               created_at REAL NOT NULL,
               retired_at REAL
           )""",
        """CREATE TABLE images (
               id            INTEGER PRIMARY KEY,
               sha256        TEXT NOT NULL,
               original_name TEXT NOT NULL,
               path          TEXT NOT NULL,
               state         TEXT NOT NULL CHECK (state IN ('pending', 'sorted', 'quarantined')),
               cluster_id    INTEGER REFERENCES clusters(id),
               distance      REAL,
               embedding     BLOB,
               reason        TEXT,
               added_at      REAL NOT NULL,
               updated_at    REAL NOT NULL
           )""",
        "CREATE INDEX images_sha256 ON images(sha256)",
        "CREATE UNIQUE INDEX images_path ON images(path)",
        "CREATE INDEX images_cluster ON images(cluster_id)",
        # An index carries the rowid as its last column, so (state, id) order comes for free:
        # iter_embedding_chunks seeks "state = ? AND id > ?" without sorting anything.
        "CREATE INDEX images_state ON images(state)",
        """CREATE TABLE fits (
               id         INTEGER PRIMARY KEY,
               at         REAL NOT NULL,
               n          INTEGER NOT NULL,
               k          INTEGER NOT NULL,
               silhouette REAL,
               scores     TEXT NOT NULL,
               moved      INTEGER NOT NULL,
               duration_s REAL NOT NULL,
               trigger    TEXT NOT NULL
           )""",
    ):
        conn.execute(sql)


def _m2_move_journal(conn: sqlite3.Connection) -> None:
    # ON DELETE SET NULL: forgetting an image must not fail because a stale journal row
    # still names it; the row keeps src/dst so recovery can still reason about the file.
    conn.execute(
        """CREATE TABLE moves (
               id         INTEGER PRIMARY KEY,
               image_id   INTEGER REFERENCES images(id) ON DELETE SET NULL,
               src        TEXT NOT NULL,
               dst        TEXT NOT NULL,
               tmp        TEXT,
               state      TEXT NOT NULL DEFAULT 'planned'
                          CHECK (state IN ('planned', 'copied')),
               created_at REAL NOT NULL
           )"""
    )
    conn.execute("CREATE INDEX moves_image ON moves(image_id)")


# Append only: position i holds the step from version i to i + 1. Never edit a shipped step;
# databases in the field have already run it.
MIGRATIONS: Final[tuple[Migration, ...]] = (_m1_initial, _m2_move_journal)
SCHEMA_VERSION: Final = len(MIGRATIONS)


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class ImageRow:
    id: int
    sha256: str
    original_name: str
    path: Path
    state: str
    cluster_id: int | None
    distance: float | None
    # compare=False: ndarray equality is elementwise and would break the generated __eq__.
    embedding: np.ndarray | None = field(compare=False, repr=False)
    reason: str | None
    added_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class ClusterRow:
    id: int
    folder: str
    centroid: np.ndarray = field(compare=False, repr=False)
    size: int
    created_at: float
    retired_at: float | None

    @property
    def active(self) -> bool:
        return self.retired_at is None


@dataclass(frozen=True, slots=True)
class FitRow:
    id: int
    at: float
    n: int
    k: int
    silhouette: float | None
    scores: dict[int, float] = field(compare=False)
    moved: int
    duration_s: float
    trigger: str


@dataclass(frozen=True, slots=True)
class MoveRow:
    id: int
    image_id: int | None
    src: Path
    dst: Path
    tmp: Path | None
    state: str
    created_at: float


_IMAGE_COLS: Final = (
    "id, sha256, original_name, path, state, cluster_id, distance, embedding, reason, "
    "added_at, updated_at"
)
_IMAGE_UPDATABLE: Final = frozenset(
    {"sha256", "path", "state", "cluster_id", "distance", "embedding", "reason"}
)
_CLUSTER_COLS: Final = "id, folder, centroid, size, created_at, retired_at"
_CLUSTER_UPDATABLE: Final = frozenset({"folder", "centroid", "size", "retired_at"})
_FIT_COLS: Final = "id, at, n, k, silhouette, scores, moved, duration_s, trigger"
_MOVE_COLS: Final = "id, image_id, src, dst, tmp, state, created_at"


# --------------------------------------------------------------------------- opening


def open_store(path: Path, *, readonly: bool = False) -> Store:
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
        version = _check_version(conn, path, readonly=readonly)
        if not readonly:
            _migrate(conn, path, version)
            _tighten_modes(path)
        dim = _read_dim(conn)
    except sqlite3.Error as e:
        conn.close()
        raise StoreError(f"{path}: cannot open state database: {e}") from e
    except BaseException:
        conn.close()
        raise
    return Store(conn, path, readonly=readonly, dim=dim)


def _precreate(path: Path) -> None:
    # Create the file ourselves with 0600 before SQLite sees it: SQLite then creates -wal and
    # -shm with the main file's permission bits. Doing it with os.open instead of changing the
    # umask keeps other threads' file creation unaffected (umask is process-wide).
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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


def _check_version(conn: sqlite3.Connection, path: Path, *, readonly: bool) -> int:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if version == 0:
        has_tables = conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None
        if has_tables:
            raise StoreError(f"{path}: is an SQLite database but not a segd state database")
    elif app_id != APPLICATION_ID:
        raise StoreError(f"{path}: is an SQLite database but not a segd state database")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: state database is schema version {version}, this segd understands up to "
            f"version {SCHEMA_VERSION}; upgrade segd (downgrading the database is not supported)"
        )
    if readonly and version < SCHEMA_VERSION:
        raise StoreError(
            f"{path}: state database is schema version {version} and needs migrating to "
            f"{SCHEMA_VERSION}; start the daemon once (read-only access cannot migrate)"
        )
    return version


def _migrate(conn: sqlite3.Connection, path: Path, version: int) -> None:
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                conn.execute("COMMIT")
                break
            MIGRATIONS[version](conn)
            # user_version lives in the database header, which is written inside this
            # transaction: the step and its version number commit or vanish together.
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise StoreError(
                    f"{path}: migrating the state database from version {version} to "
                    f"{version + 1} failed: {e}"
                ) from e
            raise
        version += 1


def _read_dim(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (META_DIM,)).fetchone()
    return int(row[0]) if row else EMBEDDING_DIM


# --------------------------------------------------------------------------- the store


class Store:
    """One connection to the state database. Create it with :func:`open_store`."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool, dim: int) -> None:
        self.path = path
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = conn
        self._dim = dim
        self._lock = threading.RLock()
        self._depth = 0  # nesting level of transaction(); 0 = autocommit
        self._in_snapshot = False

    # ---- lifecycle

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

    def __enter__(self) -> Store:
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
    def transaction(self) -> Iterator[Store]:
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
    def snapshot(self) -> Iterator[Store]:
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
        arr = np.asarray(emb, dtype=_EMB_DTYPE)
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
        return np.frombuffer(blob, dtype=_EMB_DTYPE).astype(np.float32, copy=False)

    # ---- images

    def add_image(
        self,
        sha256: str,
        original_name: str,
        path: Path | str,
        state: str,
        *,
        embedding: np.ndarray | None = None,
        cluster_id: int | None = None,
        distance: float | None = None,
        reason: str | None = None,
    ) -> int:
        what = f"add image {path}"
        _check_state(state, what)
        blob = None if embedding is None else self._to_blob(embedding, what)
        now = time.time()
        with self._write(what) as conn:
            cur = conn.execute(
                "INSERT INTO images(sha256, original_name, path, state, cluster_id, distance, "
                "embedding, reason, added_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    sha256,
                    _text_to_db(original_name),
                    _abs_path(path, what),
                    state,
                    cluster_id,
                    distance,
                    blob,
                    reason,
                    now,
                    now,
                ),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def get_image(self, image_id: int) -> ImageRow | None:
        with self._guard(f"read image {image_id}") as conn:
            row = conn.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE id = ?", (image_id,)
            ).fetchone()
        return None if row is None else self._image(row)

    def find_by_sha256(self, sha256: str) -> list[ImageRow]:
        with self._guard("find image by sha256") as conn:
            rows = conn.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE sha256 = ? ORDER BY id", (sha256,)
            ).fetchall()
        return [self._image(r) for r in rows]

    def find_by_path(self, path: Path | str) -> ImageRow | None:
        what = f"find image by path {path}"
        with self._guard(what) as conn:
            row = conn.execute(
                f"SELECT {_IMAGE_COLS} FROM images WHERE path = ?", (_abs_path(path, what),)
            ).fetchone()
        return None if row is None else self._image(row)

    def update_image(self, image_id: int, **fields: Any) -> None:
        """Change some of path, state, cluster_id, distance, embedding, reason.

        Raises TypeError for any other field name (a programming error) and StoreError if the
        image does not exist or a value is invalid. ``updated_at`` is set automatically.
        """
        with self._write(f"update image {image_id}") as conn:
            self._update_image(conn, image_id, fields)

    def _update_image(
        self, conn: sqlite3.Connection, image_id: int, fields: dict[str, Any]
    ) -> None:
        what = f"update image {image_id}"
        unknown = set(fields) - _IMAGE_UPDATABLE
        if unknown:
            raise TypeError(f"update_image: unknown field(s) {sorted(unknown)}")
        values = dict(fields)
        if "state" in values:
            _check_state(values["state"], what)
        if "path" in values:
            values["path"] = _abs_path(values["path"], what)
        if values.get("embedding") is not None:
            values["embedding"] = self._to_blob(values["embedding"], what)
        values["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in values)
        cur = conn.execute(f"UPDATE images SET {sets} WHERE id = ?", (*values.values(), image_id))
        if cur.rowcount != 1:
            raise StoreError(f"{what}: no such image")

    def delete_image(self, image_id: int) -> None:
        """Forget an image (its file left the library). Missing ids are ignored."""
        with self._write(f"delete image {image_id}") as conn:
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def iter_images(self, state: str | None = None) -> Iterator[ImageRow]:
        """All images (optionally of one state) in id order, fetched a page at a time.

        Pages are separate queries (keyset on id), so no read transaction stays open while the
        caller works; wrap the loop in snapshot() if it must see one consistent state.
        """
        if state is not None:
            _check_state(state, "iter_images")
        last = 0
        while True:
            with self._guard("iterate images") as conn:
                if state is None:
                    rows = conn.execute(
                        f"SELECT {_IMAGE_COLS} FROM images WHERE id > ? ORDER BY id LIMIT ?",
                        (last, _PAGE_ROWS),
                    ).fetchall()
                else:
                    rows = conn.execute(
                        f"SELECT {_IMAGE_COLS} FROM images WHERE state = ? AND id > ? "
                        "ORDER BY id LIMIT ?",
                        (state, last, _PAGE_ROWS),
                    ).fetchall()
                page = [self._image(r) for r in rows]
            yield from page
            if len(rows) < _PAGE_ROWS:
                return
            last = page[-1].id

    def count_by_state(self) -> dict[str, int]:
        """Image count per state; every state is present, zero when empty."""
        with self._guard("count images") as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM images GROUP BY state").fetchall()
        counts = dict.fromkeys(IMAGE_STATES, 0)
        counts.update({s: int(n) for s, n in rows})
        return counts

    def iter_embedding_chunks(
        self, chunk_rows: int = 8192, state: str | None = "sorted"
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids int64 (m,), embeddings float32 (m, dim)) with m <= chunk_rows.

        Images without an embedding are skipped. Memory is bounded by one chunk: each chunk is
        its own keyset query, so nothing larger is ever materialised (1M x 1280 floats would be
        5 GB). Arrays are fresh and writable. As with iter_images, use snapshot() for a
        consistent view across chunks.
        """
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be >= 1")
        if state is not None:
            _check_state(state, "iter_embedding_chunks")
        dim = self._dim
        last = 0
        while True:
            with self._guard("read embeddings") as conn:
                if state is None:
                    rows = conn.execute(
                        "SELECT id, embedding FROM images WHERE embedding IS NOT NULL "
                        "AND id > ? ORDER BY id LIMIT ?",
                        (last, chunk_rows),
                    ).fetchall()
                else:
                    rows = conn.execute(
                        "SELECT id, embedding FROM images WHERE state = ? AND id > ? "
                        "AND embedding IS NOT NULL ORDER BY id LIMIT ?",
                        (state, last, chunk_rows),
                    ).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            # One copy: each blob goes straight into its row of the output buffer.
            out = np.empty((len(rows), dim), dtype=_EMB_DTYPE)
            flat = out.reshape(-1).view(np.uint8)
            width = 4 * dim
            for i, (image_id, blob) in enumerate(rows):
                if len(blob) != width:
                    self._from_blob(blob, f"image {image_id}")  # raises, naming the row
                flat[i * width : (i + 1) * width] = np.frombuffer(blob, dtype=np.uint8)
            full = len(rows) == chunk_rows
            del rows  # drop the raw blobs before the caller holds the chunk: halves the peak
            yield ids, out.astype(np.float32, copy=False)
            if not full:
                return
            last = int(ids[-1])

    def load_embeddings(self, state: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All embeddings at once, for small libraries and tests: (ids int64, (n, dim) f32)."""
        ids: list[np.ndarray] = []
        embs: list[np.ndarray] = []
        with self.snapshot():
            for i, e in self.iter_embedding_chunks(state=state):
                ids.append(i)
                embs.append(e)
        if not ids:
            return np.empty(0, np.int64), np.empty((0, self._dim), np.float32)
        return np.concatenate(ids), np.concatenate(embs)

    def _image(self, r: tuple[Any, ...]) -> ImageRow:
        return ImageRow(
            id=r[0],
            sha256=r[1],
            original_name=_text_from_db(r[2]),
            path=Path(_text_from_db(r[3])),
            state=r[4],
            cluster_id=r[5],
            distance=r[6],
            embedding=self._from_blob(r[7], f"image {r[0]}"),
            reason=r[8],
            added_at=r[9],
            updated_at=r[10],
        )

    # ---- clusters

    def add_cluster(self, folder: str, centroid: np.ndarray, *, size: int = 0) -> int:
        what = f"add cluster {folder!r}"
        _check_folder(folder, what)
        blob = self._to_blob(centroid, what)
        with self._write(what) as conn:
            cur = conn.execute(
                "INSERT INTO clusters(folder, centroid, size, created_at) VALUES (?, ?, ?, ?)",
                (folder, blob, size, time.time()),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def get_cluster(self, cluster_id: int) -> ClusterRow | None:
        with self._guard(f"read cluster {cluster_id}") as conn:
            row = conn.execute(
                f"SELECT {_CLUSTER_COLS} FROM clusters WHERE id = ?", (cluster_id,)
            ).fetchone()
        return None if row is None else self._cluster(row)

    def clusters(self, active_only: bool = True) -> list[ClusterRow]:
        where = "WHERE retired_at IS NULL " if active_only else ""
        with self._guard("list clusters") as conn:
            rows = conn.execute(
                f"SELECT {_CLUSTER_COLS} FROM clusters {where}ORDER BY id"
            ).fetchall()
        return [self._cluster(r) for r in rows]

    def update_cluster(self, cluster_id: int, **fields: Any) -> None:
        """Change some of folder, centroid, size, retired_at (None un-retires).

        TypeError for other names; StoreError if the cluster does not exist or the folder name
        is taken (folder names stay unique across retired clusters too, so a retired cluster's
        folder is never silently adopted by a new one).
        """
        what = f"update cluster {cluster_id}"
        unknown = set(fields) - _CLUSTER_UPDATABLE
        if unknown:
            raise TypeError(f"update_cluster: unknown field(s) {sorted(unknown)}")
        if not fields:
            return
        values = dict(fields)
        if "folder" in values:
            _check_folder(values["folder"], what)
        if "centroid" in values:
            values["centroid"] = self._to_blob(values["centroid"], what)
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._write(what) as conn:
            cur = conn.execute(
                f"UPDATE clusters SET {sets} WHERE id = ?", (*values.values(), cluster_id)
            )
            if cur.rowcount != 1:
                raise StoreError(f"{what}: no such cluster")

    def centroid_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """Active clusters as (ids int64 (k,), centroids float32 (k, dim)), in id order."""
        rows = self.clusters(active_only=True)
        if not rows:
            return np.empty(0, np.int64), np.empty((0, self._dim), np.float32)
        ids = np.array([c.id for c in rows], dtype=np.int64)
        return ids, np.stack([c.centroid for c in rows]).astype(np.float32, copy=False)

    def add_to_cluster_size(self, cluster_id: int, delta: int) -> None:
        """Adjust one cluster's size by delta (cheaper than a recount per sorted file)."""
        with self._write(f"resize cluster {cluster_id}") as conn:
            conn.execute("UPDATE clusters SET size = size + ? WHERE id = ?", (delta, cluster_id))

    def rename_cluster_folder(self, cluster_id: int, old_dir: Path, new_dir: Path) -> int:
        """Record that a cluster's folder was renamed (by a user): the cluster's folder name
        and the path of every image under the old folder change in one transaction.
        Returns the number of image paths rewritten."""
        what = f"rename folder of cluster {cluster_id}"
        _check_folder(new_dir.name, what)
        # A rename stays beside the old folder (in the library): `library/../x` or another
        # parent would point every image path of the cluster outside the library.
        if Path(os.path.normpath(new_dir)).parent != Path(os.path.normpath(old_dir)).parent:
            raise StoreError(f"{what}: {new_dir} is not in the same folder as {old_dir}")
        old_prefix, new_prefix = str(old_dir) + "/", str(new_dir) + "/"
        if not (isinstance(_abs_path(old_dir, what), str)
                and isinstance(_abs_path(new_dir, what), str)):
            raise StoreError(f"{what}: folder names must be valid UTF-8")
        with self._write(what) as conn:
            conn.execute("UPDATE clusters SET folder = ? WHERE id = ?", (new_dir.name, cluster_id))
            cur = conn.execute(
                "UPDATE images SET path = ? || substr(path, ?), updated_at = ? "
                "WHERE substr(path, 1, ?) = ?",
                (new_prefix, len(old_prefix) + 1, time.time(), len(old_prefix), old_prefix),
            )
            return cur.rowcount

    def recount_cluster_sizes(self) -> None:
        """Set every cluster's size to its number of sorted images (after a refit or repair)."""
        with self._write("recount cluster sizes") as conn:
            conn.execute(
                "UPDATE clusters SET size = (SELECT COUNT(*) FROM images "
                "WHERE images.cluster_id = clusters.id AND images.state = 'sorted')"
            )

    def _cluster(self, r: tuple[Any, ...]) -> ClusterRow:
        centroid = self._from_blob(r[2], f"cluster {r[0]} centroid")
        assert centroid is not None  # NOT NULL column
        return ClusterRow(
            id=r[0], folder=r[1], centroid=centroid, size=r[3], created_at=r[4], retired_at=r[5]
        )

    # ---- fits

    def record_fit(
        self,
        n: int,
        k: int,
        silhouette: float | None,
        scores: dict[int, float],
        moved: int,
        duration_s: float,
        trigger: str,
    ) -> int:
        # NaN cannot round-trip (SQLite stores it as NULL, strict JSON rejects it): say None.
        sil = None if silhouette is None or not math.isfinite(silhouette) else float(silhouette)
        payload = json.dumps(
            {str(int(kk)): (float(v) if math.isfinite(v) else None) for kk, v in scores.items()}
        )
        with self._write("record fit") as conn:
            cur = conn.execute(
                f"INSERT INTO fits({_FIT_COLS.removeprefix('id, ')}) VALUES (?,?,?,?,?,?,?,?)",
                (time.time(), n, k, sil, payload, moved, duration_s, trigger),
            )
            return int(cur.lastrowid)  # type: ignore[arg-type]

    def last_fit(self) -> FitRow | None:
        with self._guard("read last fit") as conn:
            r = conn.execute(f"SELECT {_FIT_COLS} FROM fits ORDER BY id DESC LIMIT 1").fetchone()
        if r is None:
            return None
        try:
            scores = {int(kk): v for kk, v in json.loads(r[5]).items()}
        except (ValueError, AttributeError) as e:
            raise StoreError(f"{self.path}: fit {r[0]}: unreadable scores: {e}") from e
        return FitRow(
            id=r[0], at=r[1], n=r[2], k=r[3], silhouette=r[4], scores=scores,
            moved=r[6], duration_s=r[7], trigger=r[8],
        )  # fmt: skip

    # ---- move journal

    def begin_move(
        self,
        image_id: int | None,
        src: Path | str,
        dst: Path | str,
        tmp: Path | str | None = None,
    ) -> int:
        """Journal one move (see begin_moves); returns its id."""
        return self.begin_moves([(image_id, src, dst, tmp)])[0]

    def begin_moves(
        self, moves: list[tuple[int | None, Path | str, Path | str, Path | str | None]]
    ) -> list[int]:
        """Journal file moves (image_id, src, dst, tmp) and commit them durably, all in one
        commit; only then may the files be touched. Returns the move ids in order.

        Protocol for the daemon::

            mid = store.begin_move(img.id, src, dst)          # committed + fsynced
            os.rename(src, dst)                                # or copy to tmp, ...
            store.finish_move(mid, {"path": dst, "state": "sorted", ...})

        Cross-filesystem: ``begin_move(id, src, dst, tmp)``, copy to ``tmp`` and fsync,
        ``mark_move_copied(mid)``, rename ``tmp`` -> ``dst``, unlink ``src``, ``finish_move``.

        fsync the directories touched by the rename before ``finish_move``: the database
        commit is durable at once (synchronous=FULL), a rename only once its directory is
        synced, and after a power cut the row must not claim a location the file never
        reached. Recovery after a crash: see ``pending_moves``.

        Refused inside transaction(): there the row would only commit with the outer block,
        after the file was already moved, which is exactly what the journal exists to prevent.
        """
        if self._depth or self._in_snapshot:
            raise StoreError(
                "begin_move inside a transaction: the journal row must be committed before "
                "the file is touched"
            )
        ids = []
        # Several moves journaled in one commit: one fsync for a whole batch of files.
        with self._write(f"journal {len(moves)} move(s)") as conn:
            for image_id, src, dst, tmp in moves:
                what = f"journal move {src} -> {dst}"
                cur = conn.execute(
                    "INSERT INTO moves(image_id, src, dst, tmp, state, created_at) "
                    "VALUES (?, ?, ?, ?, 'planned', ?)",
                    (
                        image_id,
                        _abs_path(src, what),
                        _abs_path(dst, what),
                        None if tmp is None else _abs_path(tmp, what),
                        time.time(),
                    ),
                )
                ids.append(int(cur.lastrowid))  # type: ignore[arg-type]
        return ids

    def mark_move_copied(self, move_id: int) -> None:
        """Record that ``tmp`` holds a complete, fsynced copy of ``src`` (committed at once)."""
        if self._depth or self._in_snapshot:
            raise StoreError("mark_move_copied inside a transaction: it must commit at once")
        with self._write(f"mark move {move_id} copied") as conn:
            cur = conn.execute("UPDATE moves SET state = 'copied' WHERE id = ?", (move_id,))
            if cur.rowcount != 1:
                raise StoreError(f"mark move {move_id} copied: no such move")

    def finish_moves(self, moves: list[tuple[int, dict[str, Any] | None]]) -> None:
        """finish_move for each (move_id, image_updates), all in one commit."""
        with self.transaction():
            for move_id, updates in moves:
                self.finish_move(move_id, updates)

    def finish_move(self, move_id: int, image_updates: dict[str, Any] | None = None) -> None:
        """Delete the journal row and apply ``image_updates`` to its image, atomically.

        ``image_updates`` takes update_image's fields, typically ``path`` (the new location),
        ``state``, ``cluster_id`` and ``distance``. Empty or None just closes the journal row
        (e.g. recovery found the move never happened and left the file where it was).
        """
        what = f"finish move {move_id}"
        with self._write(what) as conn:
            row = conn.execute("SELECT image_id FROM moves WHERE id = ?", (move_id,)).fetchone()
            if row is None:
                raise StoreError(f"{what}: no such move")
            if image_updates:
                if row[0] is None:
                    raise StoreError(f"{what}: the move has no image to update")
                self._update_image(conn, row[0], image_updates)
            conn.execute("DELETE FROM moves WHERE id = ?", (move_id,))

    def pending_moves(self) -> list[MoveRow]:
        """Journal rows left open, oldest first: after a crash, the moves to reconcile.

        Reconcile each against the disk before watching the inbox again; the image row still
        holds the pre-move state, so the file's location decides:

        * ``planned`` with ``tmp``: the copy may be partial. Delete ``tmp``, then as below.
        * ``copied``: ``tmp`` is complete. If it exists, rename it to ``dst``; unlink ``src``
          if still there; ``finish_move(id, {"path": dst, ...})``.
        * ``planned``: only ``src`` exists -> nothing happened, ``finish_move(id)`` (or redo);
          only ``dst`` exists -> done, ``finish_move(id, {"path": dst, ...})``; both exist ->
          compare ``dst``'s hash with the image's ``sha256`` before deleting anything;
          neither -> the user removed the file, ``finish_move(id)`` then ``delete_image``.
        """
        with self._guard("read move journal") as conn:
            rows = conn.execute(f"SELECT {_MOVE_COLS} FROM moves ORDER BY id").fetchall()
        return [
            MoveRow(
                id=r[0],
                image_id=r[1],
                src=Path(_text_from_db(r[2])),
                dst=Path(_text_from_db(r[3])),
                tmp=None if r[4] is None else Path(_text_from_db(r[4])),
                state=r[5],
                created_at=r[6],
            )
            for r in rows
        ]

    # ---- maintenance

    def integrity_check(self) -> str:
        """SQLite's own consistency check; "ok" when the file is sound."""
        with self._guard("integrity check") as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)


# --------------------------------------------------------------------------- validation helpers


def _check_state(state: str, what: str) -> None:
    if state not in IMAGE_STATES:
        raise StoreError(f"{what}: invalid state {state!r}, expected one of {IMAGE_STATES}")


def _abs_path(path: Path | str, what: str) -> str | bytes:
    p = Path(path)
    if not p.is_absolute():
        raise StoreError(f"{what}: path {str(p)!r} is not absolute")
    return _text_to_db(str(p))


def _text_to_db(text: str) -> str | bytes:
    """File names need not be UTF-8 (Linux names are bytes): such a name is stored as the
    raw bytes in a BLOB, which SQLite keeps as is, and read back with os.fsdecode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


def _text_from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _check_folder(folder: str, what: str) -> None:
    # A folder is a name inside the library, never a path: a separator or ".." would let a
    # cluster escape the library when the daemon joins it to the library root.
    if (
        not folder
        or folder in (".", "..")
        or "/" in folder
        or "\0" in folder
        or (os.altsep and os.altsep in folder)
    ):
        raise StoreError(f"{what}: invalid folder name {folder!r}")
