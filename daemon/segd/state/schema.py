"""The state database's layout: tables, the migration steps, and the version check on open."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Final

from segd.core.errors import StoreError

EMBEDDING_DIM: Final = 1280  # MobileNetV2 pooled features
MOVE_STATES: Final = ("planned", "copied")
# "segd" in ASCII: marks the file as ours so a stray SQLite file is refused, not migrated.
APPLICATION_ID: Final = 0x73656764

META_MODEL: Final = "model_sha256"
META_DIM: Final = "embedding_dim"


# --------------------------------------------------------------------------- migrations

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



# --------------------------------------------------------------------------- opening checks


def check_version(conn: sqlite3.Connection, path: Path, *, readonly: bool) -> int:
    """The file's schema version, or StoreError for a foreign, newer or (read-only) old one."""
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


def migrate(conn: sqlite3.Connection, path: Path, version: int) -> None:
    """Run the steps from ``version`` up to SCHEMA_VERSION, one transaction each."""
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


def read_dim(conn: sqlite3.Connection) -> int:
    """The embedding length recorded by bind_model (1280 before any model was bound)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (META_DIM,)).fetchone()
    return int(row[0]) if row else EMBEDDING_DIM
