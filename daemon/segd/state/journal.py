"""The move journal (the ``moves`` table): the write-ahead record of every file move, and
the record of what each refit changed (``refits``, ``refit_clusters``, ``refit_moves``), so
that `segd undo` can put it back exactly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from segd.core.errors import StoreError
from segd.core.filing import Filing
from segd.state.db import abs_path, text_from_db
from segd.state.images import ImageTable

_MOVE_COLS: Final = "id, image_id, src, dst, tmp, state, created_at"
_UNDO_MOVE_COLS: Final = (
    "id, refit_id, image_id, src, dst, old_state, old_cluster, old_distance, old_reason, at"
)


@dataclass(frozen=True, slots=True)
class MoveRow:
    id: int
    image_id: int | None
    src: Path
    dst: Path
    tmp: Path | None
    state: str
    created_at: float


@dataclass(frozen=True, slots=True)
class RefitPoint:
    """One applied refit: when, and whether it has been undone."""

    id: int
    started_at: float
    finished_at: float | None
    undone_at: float | None


@dataclass(frozen=True, slots=True)
class ClusterBefore:
    """A cluster as it was just before a refit changed anything."""

    cluster_id: int
    folder: str
    centroid_blob: bytes
    size: int
    retired_at: float | None
    origin: str


@dataclass(frozen=True, slots=True)
class RefitMove:
    """One file a refit moved, with the filing its image had before."""

    id: int
    refit_id: int
    image_id: int | None
    src: Path
    dst: Path
    before: Filing
    at: float


class MoveJournal(ImageTable):
    """Journaled moves; closing one files its image in the same commit, hence the base."""

    # The refit whose moves are being journaled (see open_refit): each move finished while
    # it is set is remembered with the image's filing before it.
    _refit_tag: int | None = None

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
            store.finish_move(mid, Filing.sorted_into(cluster_id, distance))

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
                    "INSERT INTO moves(image_id, src, dst, tmp, state, created_at, refit_id) "
                    "VALUES (?, ?, ?, ?, 'planned', ?, ?)",
                    (
                        image_id,
                        abs_path(src, what),
                        abs_path(dst, what),
                        None if tmp is None else abs_path(tmp, what),
                        time.time(),
                        self._refit_tag,
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

    def finish_moves(self, moves: list[tuple[int, Filing | None]]) -> None:
        """finish_move for each (move_id, filing), all in one commit."""
        with self.transaction():
            for move_id, filing in moves:
                self.finish_move(move_id, filing)

    def finish_move(self, move_id: int, filing: Filing | None = None) -> None:
        """Delete the journal row and, with a ``filing``, record its outcome, atomically.

        With a filing the image's path becomes the journaled ``dst`` and its fields take the
        filing's values (the file reached dst). None just closes the journal row (e.g.
        recovery found the move never happened and left the file where it was).
        """
        what = f"finish move {move_id}"
        with self._write(what) as conn:
            row = conn.execute(
                "SELECT image_id, dst, src, refit_id FROM moves WHERE id = ?", (move_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"{what}: no such move")
            if filing is not None:
                if row[0] is None:
                    raise StoreError(f"{what}: the move has no image to update")
                if row[3] is not None:
                    # A refit's move: keep what undo needs, read before the filing changes.
                    conn.execute(
                        "INSERT INTO refit_moves(refit_id, image_id, src, dst, old_state, "
                        "old_cluster, old_distance, old_reason, at) SELECT ?, id, ?, ?, "
                        "state, cluster_id, distance, reason, ? FROM images WHERE id = ?",
                        (row[3], row[2], row[1], time.time(), row[0]),
                    )
                # dst as stored (text, or raw bytes for a name that is not UTF-8).
                self._set_filing(conn, row[0], row[1], filing, what)
            conn.execute("DELETE FROM moves WHERE id = ?", (move_id,))

    def pending_moves(self) -> list[MoveRow]:
        """Journal rows left open, oldest first: after a crash, the moves to reconcile.

        Reconcile each against the disk before watching the inbox again; the image row still
        holds the pre-move state, so the file's location decides:

        * ``planned`` with ``tmp``: the copy may be partial. Delete ``tmp``, then as below.
        * ``copied``: ``tmp`` is complete. If it exists, rename it to ``dst``; unlink ``src``
          if still there; ``finish_move(id, filing)``.
        * ``planned``: only ``src`` exists -> nothing happened, ``finish_move(id)`` (or redo);
          only ``dst`` exists -> done, ``finish_move(id, filing)``; both exist ->
          compare ``dst``'s hash with the image's ``sha256`` before deleting anything;
          neither -> the user removed the file, ``finish_move(id)`` then ``delete_image``.
        """
        with self._guard("read move journal") as conn:
            rows = conn.execute(f"SELECT {_MOVE_COLS} FROM moves ORDER BY id").fetchall()
        return [
            MoveRow(
                id=r[0],
                image_id=r[1],
                src=Path(text_from_db(r[2])),
                dst=Path(text_from_db(r[3])),
                tmp=None if r[4] is None else Path(text_from_db(r[4])),
                state=r[5],
                created_at=r[6],
            )
            for r in rows
        ]

    # ---- undo points

    def open_refit(self) -> int:
        """Start recording a refit: the clusters as they are now, and (until close_refit)
        every move this store journals. Returns the refit's id."""
        if self._depth or self._in_snapshot:
            raise StoreError("open_refit inside a transaction: the snapshot must commit first")
        with self._write("open refit undo point") as conn:
            cur = conn.execute("INSERT INTO refits(started_at) VALUES (?)", (time.time(),))
            refit_id = int(cur.lastrowid)  # type: ignore[arg-type]
            conn.execute(
                "INSERT INTO refit_clusters(refit_id, cluster_id, folder, centroid, size, "
                "retired_at, origin) SELECT ?, id, folder, centroid, size, retired_at, origin "
                "FROM clusters", (refit_id,),
            )
        self._refit_tag = refit_id
        return refit_id

    def retake_refit_snapshot(self) -> None:
        """Inside an open undo point, before the refit moved anything: record the clusters
        again. A reconciliation there is the user's work, which undo must not take back."""
        refit_id = self._refit_tag
        if refit_id is None:
            return
        with self._write(f"retake snapshot of refit {refit_id}") as conn:
            if conn.execute("SELECT 1 FROM refit_moves WHERE refit_id = ? LIMIT 1",
                            (refit_id,)).fetchone():
                raise StoreError(f"refit {refit_id} has moved files: its snapshot stays")
            conn.execute("DELETE FROM refit_clusters WHERE refit_id = ?", (refit_id,))
            conn.execute(
                "INSERT INTO refit_clusters(refit_id, cluster_id, folder, centroid, size, "
                "retired_at, origin) SELECT ?, id, folder, centroid, size, retired_at, origin "
                "FROM clusters", (refit_id,),
            )

    def close_refit(self, refit_id: int) -> None:
        """The refit is applied: stop recording moves, note when it finished, and drop the
        older undo points. A refit that changed nothing (no move, every cluster as it was)
        leaves no undo point, so `segd undo` reaches the last one that did."""
        if self._refit_tag == refit_id:
            self._refit_tag = None
        with self._write(f"close refit {refit_id}") as conn:
            moved = conn.execute("SELECT 1 FROM refit_moves WHERE refit_id = ? LIMIT 1",
                                 (refit_id,)).fetchone()
            changed = conn.execute(
                "SELECT 1 FROM clusters c LEFT JOIN refit_clusters b "
                "ON b.refit_id = ? AND b.cluster_id = c.id WHERE b.cluster_id IS NULL "
                "OR b.folder IS NOT c.folder OR b.centroid IS NOT c.centroid "
                "OR b.retired_at IS NOT c.retired_at OR b.origin IS NOT c.origin LIMIT 1",
                (refit_id,),
            ).fetchone()
            if moved is None and changed is None:
                conn.execute("DELETE FROM refits WHERE id = ?", (refit_id,))
            else:
                conn.execute("UPDATE refits SET finished_at = ? WHERE id = ?",
                             (time.time(), refit_id))
                # Only the last refit can be undone: older points are dead weight.
                conn.execute("DELETE FROM refits WHERE id < ?", (refit_id,))

    def last_refit(self) -> RefitPoint | None:
        with self._guard("read last refit") as conn:
            r = conn.execute(
                "SELECT id, started_at, finished_at, undone_at FROM refits "
                "ORDER BY id DESC LIMIT 1"
            ).fetchone()
        return None if r is None else RefitPoint(*r)

    def clusters_before(self, refit_id: int) -> list[ClusterBefore]:
        """The clusters as they were when the refit began, in id order."""
        with self._guard(f"read clusters before refit {refit_id}") as conn:
            rows = conn.execute(
                "SELECT cluster_id, folder, centroid, size, retired_at, origin "
                "FROM refit_clusters WHERE refit_id = ? ORDER BY cluster_id", (refit_id,)
            ).fetchall()
        return [ClusterBefore(*r) for r in rows]

    def refit_moves(self, refit_id: int) -> list[RefitMove]:
        """Every move the refit made, in the order made."""
        with self._guard(f"read moves of refit {refit_id}") as conn:
            rows = conn.execute(
                f"SELECT {_UNDO_MOVE_COLS} FROM refit_moves WHERE refit_id = ? ORDER BY id",
                (refit_id,),
            ).fetchall()
        return [
            RefitMove(
                id=r[0], refit_id=r[1], image_id=r[2], src=Path(text_from_db(r[3])),
                dst=Path(text_from_db(r[4])),
                before=Filing(r[5], r[6], r[7], r[8]), at=r[9],
            )
            for r in rows
        ]

    def restore_clusters(self, refit_id: int, retire_at: float) -> None:
        """Put every cluster back as it was before the refit (centroid, folder, size, active
        or not, origin); a cluster the refit created is retired at ``retire_at``. The
        refit is marked undone, all in one commit."""
        with self._write(f"restore clusters of refit {refit_id}") as conn:
            conn.execute(
                "UPDATE clusters SET retired_at = ? WHERE retired_at IS NULL AND id NOT IN "
                "(SELECT cluster_id FROM refit_clusters WHERE refit_id = ?)",
                (retire_at, refit_id),
            )
            # Folders first out of the way: names are unique, and two restored clusters
            # may have traded them.
            conn.execute(
                "UPDATE clusters SET folder = '.segd-restoring-' || id WHERE id IN "
                "(SELECT cluster_id FROM refit_clusters WHERE refit_id = ?)", (refit_id,),
            )
            conn.execute(
                "UPDATE clusters SET (folder, centroid, size, retired_at, origin) = "
                "(SELECT folder, centroid, size, retired_at, origin FROM refit_clusters b "
                "WHERE b.refit_id = ? AND b.cluster_id = clusters.id) WHERE id IN "
                "(SELECT cluster_id FROM refit_clusters WHERE refit_id = ?)",
                (refit_id, refit_id),
            )
            conn.execute("UPDATE refits SET undone_at = ? WHERE id = ?", (retire_at, refit_id))
