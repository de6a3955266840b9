"""The images table: one row per photo segd knows of, with its embedding and where it is."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import numpy as np

from segd.core.errors import StoreError
from segd.core.filing import IMAGE_STATES, Filing
from segd.state.db import EMB_DTYPE, Database, abs_path, text_from_db, text_to_db

_PAGE_ROWS: Final = 1024  # rows per query when iterating image rows
_IMAGE_COLS: Final = (
    "id, sha256, original_name, path, state, cluster_id, distance, embedding, reason, "
    "added_at, updated_at, pinned, file_id, file_size"
)
# The same columns, with whether there is an embedding in place of its 5 KiB.
_IMAGE_COLS_NO_VECTOR: Final = _IMAGE_COLS.replace(" embedding,", " embedding IS NOT NULL,")
# Filing's fields are images columns of the same names: a field added there is written too.
_FILING_COLS: Final = tuple(f.name for f in fields(Filing))


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
    pinned: bool = False
    file_id: str | None = None  # st_dev:st_ino at the last library scan
    file_size: int | None = None
    # Whether the row has an embedding, also when it was read without it (`embedding` None).
    has_embedding: bool = field(default=False, compare=False)

    @property
    def filing(self) -> Filing:
        """Where the image stands now, as the value a move or a correction starts from."""
        return Filing(**{name: getattr(self, name) for name in _FILING_COLS})


@dataclass(frozen=True, slots=True)
class Correction:
    """One thing the user did in the library that segd followed."""

    at: float
    kind: str  # moved, added, folder, merged, emptied, deleted
    image_id: int | None
    cluster_id: int | None
    detail: str


class ImageTable(Database):
    """Reading and writing image rows."""

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
        pinned: bool = False,
    ) -> int:
        what = f"add image {path}"
        _check_state(state, what)
        if pinned and (state != "sorted" or cluster_id is None):
            raise StoreError(f"{what}: only a file sorted into a cluster can be pinned")
        blob = None if embedding is None else self._to_blob(embedding, what)
        now = time.time()
        with self._write(what) as conn:
            cur = conn.execute(
                "INSERT INTO images(sha256, original_name, path, state, cluster_id, distance, "
                "embedding, reason, added_at, updated_at, pinned) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    sha256,
                    text_to_db(original_name),
                    abs_path(path, what),
                    state,
                    cluster_id,
                    distance,
                    blob,
                    reason,
                    now,
                    now,
                    pinned,
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
                f"SELECT {_IMAGE_COLS} FROM images WHERE path = ?", (abs_path(path, what),)
            ).fetchone()
        return None if row is None else self._image(row)

    def file_image(self, image_id: int, path: Path | str, filing: Filing) -> None:
        """Record that the image's file is now at ``path``, filed as ``filing``: for a move
        made outside the journal (a user moved the file between folders).

        StoreError if the image does not exist, ``path`` is not absolute or another image
        holds it, or the filing names an unknown cluster. ``updated_at`` is set as well.
        """
        what = f"file image {image_id}"
        with self._write(what) as conn:
            self._set_filing(conn, image_id, abs_path(path, what), filing, what)

    def record_content(self, image_id: int, sha256: str, embedding: np.ndarray) -> None:
        """A new version of the image's file (the same name, other bytes): its hash and
        embedding. Where it is filed does not change."""
        what = f"record content of image {image_id}"
        blob = self._to_blob(embedding, what)
        with self._write(what) as conn:
            cur = conn.execute(
                "UPDATE images SET sha256 = ?, embedding = ?, updated_at = ? WHERE id = ?",
                (sha256, blob, time.time(), image_id),
            )
            if cur.rowcount != 1:
                raise StoreError(f"{what}: no such image")

    def _set_filing(
        self, conn: sqlite3.Connection, image_id: int, path: str | bytes, filing: Filing,
        what: str,
    ) -> None:
        """Write the path and every field of ``filing`` (one column per field)."""
        _check_state(filing.state, what)
        values = [getattr(filing, name) for name in _FILING_COLS]
        sets = ", ".join(f"{name} = ?" for name in ("path", *_FILING_COLS, "updated_at"))
        cur = conn.execute(
            f"UPDATE images SET {sets} WHERE id = ?", (path, *values, time.time(), image_id)
        )
        if cur.rowcount != 1:
            raise StoreError(f"{what}: no such image")

    def delete_image(self, image_id: int) -> None:
        """Forget an image (its file left the library). Missing ids are ignored."""
        with self._write(f"delete image {image_id}") as conn:
            conn.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def iter_images(
        self, state: str | None = None, *, embeddings: bool = True
    ) -> Iterator[ImageRow]:
        """All images (optionally of one state) in id order, fetched a page at a time.

        Pages are separate queries (keyset on id), so no read transaction stays open while the
        caller works; wrap the loop in snapshot() if it must see one consistent state.
        ``embeddings=False``: rows without their vector (``has_embedding`` says whether there
        is one), for a walk over every image that needs none: 5 KiB less read per row.
        """
        if state is not None:
            _check_state(state, "iter_images")
        cols = _IMAGE_COLS if embeddings else _IMAGE_COLS_NO_VECTOR
        last = 0
        while True:
            with self._guard("iterate images") as conn:
                if state is None:
                    rows = conn.execute(
                        f"SELECT {cols} FROM images WHERE id > ? ORDER BY id LIMIT ?",
                        (last, _PAGE_ROWS),
                    ).fetchall()
                else:
                    rows = conn.execute(
                        f"SELECT {cols} FROM images WHERE state = ? AND id > ? "
                        "ORDER BY id LIMIT ?",
                        (state, last, _PAGE_ROWS),
                    ).fetchall()
                page = [self._image(r, embeddings) for r in rows]
            yield from page
            if len(rows) < _PAGE_ROWS:
                return
            last = page[-1].id

    def pinned_clusters(self, ids: np.ndarray) -> np.ndarray:
        """For each image id in ``ids``: the cluster it is pinned to, or -1 where it is not
        pinned (or unknown). int64, aligned with ``ids`` (e.g. iter_embedding_chunks' ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._guard("read pinned images") as conn:
            rows = conn.execute(
                "SELECT id, cluster_id FROM images WHERE pinned = 1 ORDER BY id"
            ).fetchall()
        return _aligned(ids, rows)

    def sorted_clusters(self, ids: np.ndarray) -> np.ndarray:
        """For each image id in ``ids`` (ascending): the cluster it is sorted into, -1 where
        it is not sorted (or unknown). Read without the embeddings."""
        ids = np.asarray(ids, dtype=np.int64)
        with self._guard("read sorted images") as conn:
            rows = conn.execute(
                "SELECT id, cluster_id FROM images WHERE state = 'sorted' "
                "AND cluster_id IS NOT NULL ORDER BY id"
            ).fetchall()
        return _aligned(ids, rows)

    def pinned_mask(self, ids: np.ndarray) -> np.ndarray:
        """True where the image of that id is pinned: the rows a refit must not move."""
        return self.pinned_clusters(ids) >= 0

    def record_file_ids(self, seen: list[tuple[int, str, int]]) -> None:
        """Remember (image_id, st_dev:st_ino, size) of files a library scan saw at their
        stored paths: a file later moved to a folder segd does not know is found by them."""
        if not seen:
            return
        with self._write(f"record {len(seen)} file identities") as conn:
            conn.executemany(
                "UPDATE images SET file_id = ?, file_size = ? WHERE id = ?",
                [(fid, size, iid) for iid, fid, size in seen],
            )

    def record_correction(
        self, image_id: int | None, kind: str, cluster_id: int | None, detail: str
    ) -> None:
        """Log one thing the user did that segd followed (the "why" `segd explain` gives)."""
        with self._write(f"record correction {kind}") as conn:
            conn.execute(
                "INSERT INTO corrections(at, kind, image_id, cluster_id, detail) "
                "VALUES (?, ?, ?, ?, ?)",
                (time.time(), kind, image_id, cluster_id, detail),
            )

    def corrections_of(self, image_id: int) -> list[Correction]:
        """The corrections recorded for one image, oldest first."""
        with self._guard(f"read corrections of image {image_id}") as conn:
            rows = conn.execute(
                "SELECT at, kind, image_id, cluster_id, detail FROM corrections "
                "WHERE image_id = ? ORDER BY id", (image_id,)
            ).fetchall()
        return [Correction(*r) for r in rows]

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
            ids, out = self._rows_to_arrays(rows)
            full = len(rows) == chunk_rows
            del rows  # drop the raw blobs before the caller holds the chunk: halves the peak
            yield ids, out
            if not full:
                return
            last = int(ids[-1])

    def ids_with_embeddings(self, state: str | None = None) -> np.ndarray:
        """The ids (int64, ascending) iter_embedding_chunks yields, without reading a vector:
        what a caller needs to pick rows at random before the one pass over them."""
        if state is not None:
            _check_state(state, "ids_with_embeddings")
        where = "embedding IS NOT NULL" + ("" if state is None else " AND state = ?")
        with self._guard("read image ids") as conn:
            # One string, not a million tuples: several times faster to bring into numpy.
            (text,) = conn.execute(
                f"SELECT group_concat(id) FROM (SELECT id FROM images WHERE {where} "
                "ORDER BY id)", () if state is None else (state,)
            ).fetchone()
        if not text:
            return np.empty(0, np.int64)
        ids = np.array(text.split(","), dtype=np.int64)
        # The aggregate sees the rows in the subquery's order in practice, not by contract.
        return ids if np.all(ids[1:] > ids[:-1]) else np.sort(ids)

    def embeddings_of(self, ids: np.ndarray, batch_rows: int = 4096) -> np.ndarray:
        """The embeddings of the given ids (ascending, each with an embedding), (m, dim)
        float32 in that order: a random sample of rows, read without a pass over the table.
        StoreError if one is missing (use snapshot() to read against a fixed set of ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self._dim), dtype=np.float32)
        for lo in range(0, len(ids), batch_rows):
            part = ids[lo : lo + batch_rows]
            with self._guard("read embeddings by id") as conn:
                rows = conn.execute(
                    "SELECT id, embedding FROM images WHERE embedding IS NOT NULL AND id IN "
                    "(SELECT value FROM json_each(?)) ORDER BY id",
                    (json.dumps(part.tolist()),),
                ).fetchall()
            got, block = self._rows_to_arrays(rows)
            if not np.array_equal(got, part):
                raise StoreError(
                    f"{self.path}: {len(part) - len(got)} of the {len(part)} images asked "
                    "for have no embedding (any more)"
                )
            out[lo : lo + len(part)] = block
        return out

    def _rows_to_arrays(self, rows: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(id, blob) rows as (ids int64, embeddings float32): each blob copied once, straight
        into its row of a fresh writable array (a memoryview slice: half numpy's cost)."""
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        out = np.empty((len(rows), self._dim), dtype=EMB_DTYPE)
        flat = memoryview(out.reshape(-1).view(np.uint8))
        width = 4 * self._dim
        for i, (image_id, blob) in enumerate(rows):
            if len(blob) != width:
                self._from_blob(blob, f"image {image_id}")  # raises, naming the row
            flat[i * width : (i + 1) * width] = blob
        return ids, out.astype(np.float32, copy=False)

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

    def _image(self, r: tuple[Any, ...], embedding: bool = True) -> ImageRow:
        return ImageRow(
            id=r[0],
            sha256=r[1],
            original_name=text_from_db(r[2]),
            path=Path(text_from_db(r[3])),
            state=r[4],
            cluster_id=r[5],
            distance=r[6],
            embedding=self._from_blob(r[7], f"image {r[0]}") if embedding else None,
            reason=r[8],
            added_at=r[9],
            updated_at=r[10],
            pinned=bool(r[11]),
            file_id=r[12],
            file_size=r[13],
            has_embedding=bool(r[7]) if not embedding else r[7] is not None,
        )


def _aligned(ids: np.ndarray, rows: list[Any]) -> np.ndarray:
    """(id, cluster_id) rows in id order, as the cluster of each of ``ids`` (-1: none)."""
    out = np.full(len(ids), -1, dtype=np.int64)
    if rows:
        row_ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        clusters = np.fromiter((r[1] for r in rows), np.int64, len(rows))
        pos = np.searchsorted(row_ids, ids)
        pos[pos == len(row_ids)] = 0
        hit = row_ids[pos] == ids
        out[hit] = clusters[pos[hit]]
    return out


def _check_state(state: str, what: str) -> None:
    if state not in IMAGE_STATES:
        raise StoreError(f"{what}: invalid state {state!r}, expected one of {IMAGE_STATES}")
