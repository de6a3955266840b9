"""Following the user's work in the library: pins and user clusters in the store, and
start-up reconciliation against real folders and a real SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from segd.core.filing import Filing
from segd.state import schema
from segd.state.store import Store, open_store

DIM = schema.EMBEDDING_DIM


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "segd.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    s = open_store(db)
    yield s
    s.close()


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


# --------------------------------------------------------------------------- the store


def _make_v2(db: Path) -> None:
    """A database as release 2 left it (journal, no pins), holding one sorted photo."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    schema.MIGRATIONS[0](conn)
    schema.MIGRATIONS[1](conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("COMMIT")
    e = np.asarray(vec(1), "<f4").tobytes()
    conn.execute("INSERT INTO clusters(folder, centroid, size, created_at) "
                 "VALUES ('dogs', ?, 1, 1.0)", (e,))
    conn.execute("INSERT INTO images(sha256, original_name, path, state, cluster_id, distance,"
                 " embedding, added_at, updated_at) VALUES ('s1', 'a.jpg', '/lib/dogs/a.jpg',"
                 " 'sorted', 1, 0.5, ?, 1.0, 1.0)", (e,))
    conn.close()


def test_a_v2_database_migrates_with_nothing_pinned(db: Path) -> None:
    _make_v2(db)
    with open_store(db) as s:
        row = s.get_image(1)
        assert row is not None and row.pinned is False and row.file_id is None
        assert row.filing == Filing.sorted_into(1, 0.5)
        cluster = s.get_cluster(1)
        assert cluster is not None and cluster.origin == "fit"
        assert s.pinned_mask(np.array([1])).tolist() == [False]
        assert s.integrity_check() == "ok"
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 3
    assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    raw.close()


def test_a_pin_is_written_with_the_filing_and_read_back(store: Store) -> None:
    cid = store.add_cluster("cats", vec(2))
    a = store.add_image("a" * 64, "a.jpg", "/lib/dogs/a.jpg", "sorted", embedding=vec(3))
    b = store.add_image("b" * 64, "b.jpg", "/lib/dogs/b.jpg", "sorted", embedding=vec(4))
    store.file_image(a, "/lib/cats/a.jpg", Filing.pinned_to(cid, 0.4))
    row = store.get_image(a)
    assert row is not None and row.pinned and row.cluster_id == cid
    assert row.filing == Filing.pinned_to(cid, 0.4)
    assert [r.pinned for r in store.iter_images()] == [True, False]
    # A later filing that does not say pinned unpins: no value survives by accident.
    mid = store.begin_move(a, "/lib/cats/a.jpg", "/lib/dogs/a.jpg")
    store.finish_move(mid, Filing.sorted_into(cid, 0.1))
    row = store.get_image(a)
    assert row is not None and not row.pinned
    assert store.get_image(b) is not None


def test_pinned_mask_is_aligned_with_the_embedding_chunks(store: Store) -> None:
    c1 = store.add_cluster("dogs", vec(1))
    c2 = store.add_cluster("cats", vec(2))
    ids = [store.add_image(f"{i:064x}", f"{i}.jpg", f"/lib/dogs/{i}.jpg", "sorted",
                           embedding=vec(10 + i), cluster_id=c1, distance=0.3)
           for i in range(7)]
    store.file_image(ids[1], "/lib/cats/1.jpg", Filing.pinned_to(c2, 0.2))
    store.file_image(ids[5], "/lib/dogs/5.jpg", Filing.pinned_to(c1, 0.2))
    chunk_ids = np.concatenate([i for i, _ in store.iter_embedding_chunks(chunk_rows=3)])
    assert store.pinned_mask(chunk_ids).tolist() == [i in (1, 5) for i in range(7)]
    assert store.pinned_clusters(chunk_ids).tolist() == [-1, c2, -1, -1, -1, c1, -1]
    # Unknown ids, an empty query and an unsorted order are answered too.
    assert store.pinned_clusters(np.array([ids[5], 999, ids[1]])).tolist() == [c1, -1, c2]
    assert store.pinned_mask(np.array([], np.int64)).tolist() == []


def test_only_a_sorted_file_can_be_pinned() -> None:
    with pytest.raises(ValueError, match="pinned"):
        Filing("quarantined", reason="x", pinned=True)
    with pytest.raises(ValueError, match="pinned"):
        Filing("sorted", None, pinned=True)


def test_a_user_cluster_keeps_its_origin(store: Store) -> None:
    cid = store.add_cluster("mine", vec(1), origin="user")
    other = store.add_cluster("cluster-1", vec(2))
    assert [(c.folder, c.origin) for c in store.clusters()] == [("mine", "user"),
                                                                ("cluster-1", "fit")]
    store.update_cluster(other, origin="user")
    got = store.get_cluster(other)
    assert got is not None and got.origin == "user"
    with pytest.raises(Exception, match="invalid origin"):
        store.update_cluster(cid, origin="magic")
