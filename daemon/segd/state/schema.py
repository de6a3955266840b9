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


def _m3_corrections(conn: sqlite3.Connection) -> None:
    for sql in (
        # A pinned image was placed by the user (moved between folders, or put in a folder
        # the user made): its cluster is the folder's, and no refit moves it again.
        "ALTER TABLE images ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0 "
        "CHECK (pinned IN (0, 1))",
        # The file's identity (st_dev:st_ino) and size as the last library scan saw them:
        # a file the user moved to a folder segd does not know is found again by them.
        "ALTER TABLE images ADD COLUMN file_id TEXT",
        "ALTER TABLE images ADD COLUMN file_size INTEGER",
        "CREATE INDEX images_pinned ON images(id) WHERE pinned = 1",
        # 'user': a folder the user made became this cluster; a refit keeps it.
        "ALTER TABLE clusters ADD COLUMN origin TEXT NOT NULL DEFAULT 'fit' "
        "CHECK (origin IN ('fit', 'user'))",
        # The refit a journaled move belongs to (NULL for intake, quarantine and undo moves).
        "ALTER TABLE moves ADD COLUMN refit_id INTEGER",
        # One undo point per applied refit: the clusters as they were, and every move made.
        """CREATE TABLE refits (
               id          INTEGER PRIMARY KEY AUTOINCREMENT,
               started_at  REAL NOT NULL,
               finished_at REAL,
               undone_at   REAL
           )""",
        """CREATE TABLE refit_clusters (
               refit_id   INTEGER NOT NULL REFERENCES refits(id) ON DELETE CASCADE,
               cluster_id INTEGER NOT NULL,
               folder     TEXT NOT NULL,
               centroid   BLOB NOT NULL,
               size       INTEGER NOT NULL,
               retired_at REAL,
               origin     TEXT NOT NULL,
               PRIMARY KEY (refit_id, cluster_id)
           )""",
        # The image's filing before the move, so undo restores it exactly.
        """CREATE TABLE refit_moves (
               id           INTEGER PRIMARY KEY,
               refit_id     INTEGER NOT NULL REFERENCES refits(id) ON DELETE CASCADE,
               image_id     INTEGER REFERENCES images(id) ON DELETE SET NULL,
               src          TEXT NOT NULL,
               dst          TEXT NOT NULL,
               old_state    TEXT NOT NULL,
               old_cluster  INTEGER,
               old_distance REAL,
               old_reason   TEXT,
               at           REAL NOT NULL
           )""",
        "CREATE INDEX refit_moves_refit ON refit_moves(refit_id)",
        # What the user did in the library, as segd followed it: the "why" of a pin.
        """CREATE TABLE corrections (
               id         INTEGER PRIMARY KEY,
               at         REAL NOT NULL,
               kind       TEXT NOT NULL,
               image_id   INTEGER REFERENCES images(id) ON DELETE CASCADE,
               cluster_id INTEGER,
               detail     TEXT NOT NULL
           )""",
        "CREATE INDEX corrections_image ON corrections(image_id)",
    ):
        conn.execute(sql)


def _m4_fit_choice(conn: sqlite3.Connection) -> None:
    # How sure a fit's k was (kselect.KChoice): `segd status` shows it long after the fit.
    for sql in (
        "ALTER TABLE fits ADD COLUMN rule TEXT",
        "ALTER TABLE fits ADD COLUMN runner_up INTEGER",
        "ALTER TABLE fits ADD COLUMN margin REAL",
    ):
        conn.execute(sql)


# Append only: position i holds the step from version i to i + 1. Never edit a shipped step;
# databases in the field have already run it.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    _m1_initial, _m2_move_journal, _m3_corrections, _m4_fit_choice)
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
