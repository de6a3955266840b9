"""The daemon's memory across restarts: one SQLite file, safe against ``kill -9`` at any instant.

Layout and guarantees
---------------------
* One file, ``segd.db`` in the state directory, in WAL mode. A reader in another process
  (``segd status``) sees the last committed state and never blocks the writer, nor the writer it.
* Every write runs inside ``BEGIN IMMEDIATE ... COMMIT``; a process killed at any instant leaves
  either the whole transaction or nothing of it. ``synchronous=FULL`` adds durability against
  power loss (see ``db._configure``).
* The schema is versioned by ``PRAGMA user_version`` and moved forward by ``MIGRATIONS``, one
  transaction per step; a database written by a newer segd is refused rather than guessed at.
* File moves go through a write-ahead journal (the ``moves`` table): ``begin_move`` commits the
  intent before the file is touched, ``finish_move`` deletes the intent and records the result in
  one transaction. After a crash ``pending_moves`` lists exactly the moves whose outcome on disk
  must be checked (see ``begin_move``).

Modules: ``schema`` (tables, migrations, version check), ``db`` (the connection owner:
opening, transactions, snapshots, meta), and one class per table group building on it:
``images``, ``clusters`` (with fits) and ``journal`` (moves). ``Store`` combines them, so
callers keep one object and one flat set of methods; every class shares the one connection
and lock of ``Database``, so a transaction spans tables (a move's journal row and its image).

Threading: a ``Store`` owns one connection opened with ``check_same_thread=False`` and guards it
with a re-entrant lock held for each call and for the whole of a ``transaction()`` block, so the
daemon may create it on the main thread and use it from its writer thread, and a second thread
cannot slip statements into another thread's transaction. Iterators take the lock per page only,
so a slow consumer never stalls other threads.
"""

from __future__ import annotations

from pathlib import Path

from segd.core.errors import StoreError
from segd.core.filing import IMAGE_STATES, Filing
from segd.state.clusters import ClusterRow, ClusterTable, FitRow
from segd.state.images import ImageRow
from segd.state.journal import MoveJournal, MoveRow
from segd.state.schema import (
    EMBEDDING_DIM,
    META_DIM,
    META_MODEL,
    MIGRATIONS,
    MOVE_STATES,
    SCHEMA_VERSION,
)

__all__ = [
    "DB_NAME", "EMBEDDING_DIM", "IMAGE_STATES", "META_DIM", "META_MODEL", "MIGRATIONS",
    "MOVE_STATES", "SCHEMA_VERSION", "ClusterRow", "Filing", "FitRow", "ImageRow", "MoveRow",
    "Store", "StoreError", "open_store",
]

DB_NAME = "segd.db"


class Store(MoveJournal, ClusterTable):
    """One connection to the state database. Create it with :func:`open_store`."""


def open_store(path: Path, *, readonly: bool = False) -> Store:
    """Open (creating and migrating when writable) the state database at ``path``; see
    ``Database.open``."""
    return Store.open(path, readonly=readonly)
