"""The move journal (the ``moves`` table): the write-ahead record of every file move."""

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


@dataclass(frozen=True, slots=True)
class MoveRow:
    id: int
    image_id: int | None
    src: Path
    dst: Path
    tmp: Path | None
    state: str
    created_at: float


class MoveJournal(ImageTable):
    """Journaled moves; closing one files its image in the same commit, hence the base."""

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
                    "INSERT INTO moves(image_id, src, dst, tmp, state, created_at) "
                    "VALUES (?, ?, ?, ?, 'planned', ?)",
                    (
                        image_id,
                        abs_path(src, what),
                        abs_path(dst, what),
                        None if tmp is None else abs_path(tmp, what),
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
                "SELECT image_id, dst FROM moves WHERE id = ?", (move_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"{what}: no such move")
            if filing is not None:
                if row[0] is None:
                    raise StoreError(f"{what}: the move has no image to update")
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
