"""The state database: round trips, migrations, permissions and crash safety on real files."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from segd.core.errors import StoreError
from segd.core.filing import Filing
from segd.state import schema
from segd.state import store as st
from segd.state.store import Store, open_store

DIM = st.EMBEDDING_DIM


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / st.DB_NAME


@pytest.fixture
def s(db: Path) -> Iterator[Store]:
    store = open_store(db)
    yield store
    store.close()


def vec(seed: float) -> np.ndarray:
    return np.random.default_rng(int(seed * 1000)).standard_normal(DIM).astype(np.float32)


# --------------------------------------------------------------------------- round trips


def test_image_round_trip(s: Store) -> None:
    e = vec(1)
    cid = s.add_cluster("beach", vec(2))
    iid = s.add_image(
        "a" * 64, "IMG_1.jpg", "/lib/beach/IMG_1.jpg", "sorted",
        embedding=e, cluster_id=cid, distance=0.25,
    )  # fmt: skip
    row = s.get_image(iid)
    assert row is not None
    assert (row.sha256, row.original_name, row.path, row.state) == (
        "a" * 64, "IMG_1.jpg", Path("/lib/beach/IMG_1.jpg"), "sorted",
    )  # fmt: skip
    assert (row.cluster_id, row.distance, row.reason) == (cid, 0.25, None)
    assert row.embedding is not None and row.embedding.dtype == np.float32
    assert np.array_equal(row.embedding, e)  # exact, bit for bit
    assert row.added_at == row.updated_at > 0

    q = s.add_image("b" * 64, "x.jpg", "/inbox/x.jpg", "quarantined", reason="truncated")
    qrow = s.get_image(q)
    assert qrow is not None and qrow.embedding is None and qrow.reason == "truncated"
    assert s.get_image(9999) is None
    assert s.find_by_path("/lib/beach/IMG_1.jpg") == row
    assert s.find_by_path(Path("/nope.jpg")) is None
    assert [r.id for r in s.find_by_sha256("a" * 64)] == [iid]
    assert s.count_by_state() == {"pending": 0, "sorted": 1, "quarantined": 1}
    assert [r.id for r in s.iter_images()] == [iid, q]
    assert [r.id for r in s.iter_images("quarantined")] == [q]

    assert row.filing == Filing.sorted_into(cid, 0.25)
    assert qrow.filing == Filing("quarantined", reason="truncated")

    s.file_image(q, "/inbox/y.jpg", Filing.pending())  # every field written: reason cleared
    s.record_content(q, "c" * 64, e)
    qrow2 = s.get_image(q)
    assert qrow2 is not None
    assert (qrow2.state, qrow2.reason, qrow2.path) == ("pending", None, Path("/inbox/y.jpg"))
    assert qrow2.sha256 == "c" * 64 and qrow2.original_name == "x.jpg"
    assert qrow2.embedding is not None and np.array_equal(qrow2.embedding, e)
    assert qrow2.updated_at >= qrow.updated_at
    s.file_image(q, "/lib/beach/y.jpg", Filing.sorted_into(cid, 0.5))
    qrow3 = s.get_image(q)
    assert qrow3 is not None and qrow3.path == Path("/lib/beach/y.jpg")
    assert qrow3.filing == Filing("sorted", cid, 0.5)
    assert qrow3.sha256 == "c" * 64  # content untouched by filing
    assert qrow3.embedding is not None and np.array_equal(qrow3.embedding, e)

    s.delete_image(q)
    assert s.get_image(q) is None


def test_image_validation(s: Store) -> None:
    s.add_image("a", "a.jpg", "/x/a.jpg", "pending")
    with pytest.raises(StoreError, match="constraint"):
        s.add_image("b", "a.jpg", "/x/a.jpg", "pending")  # path is unique
    with pytest.raises(StoreError, match="invalid state"):
        s.add_image("b", "b.jpg", "/x/b.jpg", "lost")
    with pytest.raises(StoreError, match="not absolute"):
        s.add_image("b", "b.jpg", "rel/b.jpg", "pending")
    with pytest.raises(StoreError, match="shape"):
        s.add_image("b", "b.jpg", "/x/b.jpg", "pending", embedding=np.zeros(DIM - 1))
    with pytest.raises(StoreError, match="constraint"):
        s.add_image("b", "b.jpg", "/x/b.jpg", "sorted", cluster_id=42)  # foreign key
    with pytest.raises(StoreError, match="no such image"):
        s.file_image(77, "/x/z.jpg", Filing.pending())
    with pytest.raises(StoreError, match="no such image"):
        s.record_content(77, "z", vec(1))
    s.add_image("c", "c.jpg", "/x/c.jpg", "pending")
    with pytest.raises(StoreError, match="constraint"):
        s.file_image(1, "/x/c.jpg", Filing.pending())  # path is unique
    with pytest.raises(StoreError, match="constraint"):
        s.file_image(1, "/x/d.jpg", Filing.sorted_into(42, 0.1))  # foreign key
    with pytest.raises(StoreError, match="not absolute"):
        s.file_image(1, "rel/d.jpg", Filing.pending())
    with pytest.raises(StoreError, match="shape"):
        s.record_content(1, "z", np.zeros(DIM - 1))
    with pytest.raises(ValueError, match="invalid state"):
        Filing("lost")
    assert s.count_by_state()["pending"] == 2
    a = s.get_image(1)
    assert a is not None and (a.path, a.sha256, a.embedding) == (Path("/x/a.jpg"), "a", None)


def test_corrupt_embedding_names_the_row(s: Store, db: Path) -> None:
    iid = s.add_image("a", "a.jpg", "/x/a.jpg", "sorted", embedding=vec(1))
    raw = sqlite3.connect(db)
    raw.execute("UPDATE images SET embedding = ? WHERE id = ?", (b"\0" * 12, iid))
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match=f"image {iid}"):
        s.get_image(iid)
    with pytest.raises(StoreError, match=f"image {iid}"):
        list(s.iter_embedding_chunks())


def test_embedding_chunks_stream_everything_in_bounded_chunks(s: Store) -> None:
    rng = np.random.default_rng(0)
    embs = rng.standard_normal((1000, DIM)).astype(np.float32)
    with s.transaction():
        ids = [
            s.add_image(f"{i}", f"{i}.jpg", f"/l/{i}.jpg", "sorted", embedding=embs[i])
            for i in range(1000)
        ]
        s.add_image("q", "q.jpg", "/l/q.jpg", "quarantined", embedding=embs[0])
        s.add_image("p", "p.jpg", "/l/p.jpg", "sorted")  # no embedding yet: skipped
    chunks = s.iter_embedding_chunks(chunk_rows=64)
    first_ids, first = next(chunks)
    # No read transaction is held between chunks: the writer is free meanwhile.
    s.set_meta("touched", "1")
    got = [(first_ids, first), *chunks]
    assert all(len(i) == len(e) <= 64 for i, e in got)
    assert len(got) == 16  # ceil(1000 / 64)
    all_ids = np.concatenate([i for i, _ in got])
    all_emb = np.concatenate([e for _, e in got])
    assert all_ids.dtype == np.int64 and all_emb.dtype == np.float32
    assert all_ids.tolist() == ids
    assert np.array_equal(all_emb, embs)
    assert first.flags.writeable

    ids_all, m = s.load_embeddings()
    assert len(ids_all) == 1001 and m.shape == (1001, DIM)
    ids_q, m_q = s.load_embeddings("quarantined")
    assert len(ids_q) == 1 and np.array_equal(m_q[0], embs[0])
    ids_p, m_p = s.load_embeddings("pending")
    assert ids_p.shape == (0,) and m_p.shape == (0, DIM)


def test_clusters_round_trip(s: Store, db: Path) -> None:
    a = s.add_cluster("cluster-001", vec(1))
    b = s.add_cluster("cluster-002", vec(2))
    c = s.add_cluster("cluster-003", vec(3))
    with pytest.raises(StoreError, match="constraint"):
        s.add_cluster("cluster-001", vec(4))
    for bad in ("", "..", "a/b"):
        with pytest.raises(StoreError, match="invalid folder"):
            s.add_cluster(bad, vec(4))

    s.update_cluster(a, folder="Beach 2024", centroid=vec(5))
    s.update_cluster(b, retired_at=123.0)
    assert [x.id for x in s.clusters()] == [a, c]
    assert [x.id for x in s.clusters(active_only=False)] == [a, b, c]
    row = s.get_cluster(a)
    assert row is not None and row.folder == "Beach 2024" and row.active
    assert np.array_equal(row.centroid, vec(5))
    ids, m = s.centroid_matrix()
    assert ids.tolist() == [a, c] and m.dtype == np.float32
    assert np.array_equal(m, np.stack([vec(5), vec(3)]))
    with pytest.raises(StoreError, match="no such cluster"):
        s.update_cluster(99, size=1)
    with pytest.raises(TypeError):
        s.update_cluster(a, created_at=1.0)

    for i in range(3):
        s.add_image(f"{i}", "x", f"/l/a{i}.jpg", "sorted", cluster_id=a)
    s.add_image("q", "x", "/l/q.jpg", "quarantined", cluster_id=a)  # not counted
    s.add_image("c", "x", "/l/c.jpg", "sorted", cluster_id=c)
    s.recount_cluster_sizes()
    assert {x.id: x.size for x in s.clusters(active_only=False)} == {a: 3, b: 0, c: 1}

    # AUTOINCREMENT: even if the newest cluster row vanished, its id is not handed out again.
    raw = sqlite3.connect(db)
    raw.execute("UPDATE images SET cluster_id = NULL WHERE cluster_id = ?", (c,))
    raw.execute("DELETE FROM clusters WHERE id = ?", (c,))
    raw.commit()
    raw.close()
    assert s.add_cluster("new", vec(6)) > c


def test_fits_and_meta_round_trip(s: Store) -> None:
    assert s.last_fit() is None
    s.record_fit(10, 2, 0.4, {2: 0.4}, 3, 0.1, "startup")
    fid = s.record_fit(500, 3, 0.61, {2: 0.5, 3: 0.61, 4: 0.55}, 120, 2.5, "drift")
    f = s.last_fit()
    assert f is not None and f.id == fid
    assert (f.n, f.k, f.silhouette, f.moved, f.duration_s, f.trigger) == (
        500, 3, 0.61, 120, 2.5, "drift",
    )  # fmt: skip
    assert f.scores == {2: 0.5, 3: 0.61, 4: 0.55}
    assert (f.rule, f.runner_up, f.margin) == (None, None, None)
    s.record_fit(1, 1, float("nan"), {}, 0, 0.0, "manual", rule="strength", runner_up=4,
                 margin=float("nan"))
    last = s.last_fit()
    assert last is not None and last.silhouette is None and last.scores == {}
    assert (last.rule, last.runner_up, last.margin) == ("strength", 4, None)
    s.record_fit(600, 6, 0.2, {6: 0.83}, 0, 1.0, "startup", rule="strength", runner_up=5,
                 margin=0.031)
    last = s.last_fit()
    assert last is not None and (last.rule, last.runner_up, last.margin) == ("strength", 5, 0.031)

    assert s.get_meta("x") is None and s.get_meta("x", "d") == "d"
    s.set_meta("x", "1")
    s.set_meta("x", "2")
    assert s.get_meta("x") == "2"

    s.bind_model("f" * 64, DIM)
    s.bind_model("f" * 64, DIM)  # same model: fine
    with pytest.raises(StoreError, match="cannot be mixed"):
        s.bind_model("e" * 64, DIM)
    assert s.get_meta(st.META_MODEL) == "f" * 64


def test_move_journal(s: Store) -> None:
    cid = s.add_cluster("c", vec(1))
    iid = s.add_image("a", "a.jpg", "/inbox/a.jpg", "pending", embedding=vec(2))
    mid = s.begin_move(iid, "/inbox/a.jpg", "/lib/c/a.jpg", tmp="/lib/c/.a.jpg.tmp")
    [m] = s.pending_moves()
    assert (m.id, m.image_id, m.src, m.dst, m.tmp, m.state) == (
        mid, iid, Path("/inbox/a.jpg"), Path("/lib/c/a.jpg"), Path("/lib/c/.a.jpg.tmp"), "planned",
    )  # fmt: skip
    s.mark_move_copied(mid)
    assert s.pending_moves()[0].state == "copied"

    # A failing image update leaves both the journal row and the image untouched.
    with pytest.raises(StoreError, match="constraint"):
        s.finish_move(mid, Filing.sorted_into(999, 0.1))  # no such cluster
    holder = s.add_image("h", "a.jpg", "/lib/c/a.jpg", "sorted", cluster_id=cid)
    with pytest.raises(StoreError, match="constraint"):
        s.finish_move(mid, Filing.sorted_into(cid, 0.1))  # dst held by another row
    s.delete_image(holder)
    assert len(s.pending_moves()) == 1
    row = s.get_image(iid)
    assert row is not None and row.path == Path("/inbox/a.jpg") and row.state == "pending"

    s.finish_move(mid, Filing.sorted_into(cid, 0.3))  # the path comes from the journal
    assert s.pending_moves() == []
    row = s.get_image(iid)
    assert row is not None and (row.path, row.state, row.cluster_id, row.distance) == (
        Path("/lib/c/a.jpg"), "sorted", cid, 0.3,
    )  # fmt: skip

    with pytest.raises(StoreError, match="no such move"):
        s.finish_move(mid)
    with pytest.raises(StoreError, match="no such move"):
        s.finish_move(mid, Filing.pending())
    with pytest.raises(StoreError, match="no such move"):
        s.mark_move_copied(mid)
    # A move without an image (e.g. a file quarantined before it was recorded) just closes.
    orphan = s.begin_move(None, "/inbox/b.jpg", "/q/b.jpg")
    with pytest.raises(StoreError, match="no image"):
        s.finish_move(orphan, Filing("sorted"))
    s.finish_move(orphan)
    assert s.pending_moves() == []
    with s.transaction(), pytest.raises(StoreError, match="must be committed"):
        s.begin_move(iid, "/a", "/b")


def test_names_that_are_not_utf8_round_trip_as_raw_bytes(s: Store, db: Path) -> None:
    cid = s.add_cluster("c", vec(1))
    src, dst = os.fsdecode(b"/inbox/caf\xe9.jpg"), os.fsdecode(b"/lib/c/caf\xe9 (2).jpg")
    iid = s.add_image("a", os.path.basename(src), src, "pending")
    s.finish_move(s.begin_move(iid, src, dst), Filing.sorted_into(cid, 0.1))
    row = s.get_image(iid)
    assert row is not None and row.path == Path(dst) and row.original_name == "caf\udce9.jpg"
    assert s.find_by_path(dst) == row
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT typeof(path), path FROM images").fetchone() == (
        "blob", b"/lib/c/caf\xe9 (2).jpg")
    raw.close()


def test_transactions_roll_back_whole(s: Store) -> None:
    with pytest.raises(RuntimeError), s.transaction():
        s.add_image("a", "a", "/a", "pending")
        s.set_meta("n", "1")
        raise RuntimeError
    assert s.count_by_state()["pending"] == 0 and s.get_meta("n") is None

    with s.transaction():
        s.add_image("a", "a", "/a", "pending")
        with pytest.raises(StoreError):
            s.add_image("b", "b", "/a", "pending")  # duplicate path: only this write undone
        try:
            with s.transaction():
                s.set_meta("inner", "1")
                raise KeyError
        except KeyError:
            pass
        s.set_meta("outer", "1")
    assert s.count_by_state()["pending"] == 1
    assert s.get_meta("inner") is None and s.get_meta("outer") == "1"

    with s.snapshot(), pytest.raises(StoreError, match="snapshot"):
        s.set_meta("x", "1")
    assert not s.in_transaction


def test_store_usable_from_another_thread(s: Store) -> None:
    # The daemon opens the store on its main thread and writes from a worker thread.
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(50):
                s.add_image(f"{i}", "x", f"/t/{i}", "pending")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work), threading.Thread(target=lambda: s.count_by_state())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.count_by_state()["pending"] == 50


def test_closed_store_raises(db: Path) -> None:
    store = open_store(db)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.count_by_state()


# --------------------------------------------------------------------------- files, versions


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_files_are_private(db: Path) -> None:
    old = os.umask(0o022)  # a typical umask would give 0644 without the store's care
    try:
        with open_store(db) as store:
            store.add_image("a", "a", "/a", "pending")
            for suffix in ("", "-wal", "-shm"):
                p = Path(f"{db}{suffix}")
                assert p.exists() and _mode(p) == 0o600, p
        assert _mode(db.parent) == 0o700
        # A database that became world readable (copied, restored) is tightened on open.
        db.chmod(0o644)
        open_store(db).close()
        assert _mode(db) == 0o600
    finally:
        os.umask(old)


def _make_v1(db: Path) -> None:
    """A database as the first release left it: only migration 1, then some data."""
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    schema.MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("COMMIT")
    e = np.asarray(vec(1), "<f4").tobytes()
    conn.execute(
        "INSERT INTO clusters(folder, centroid, size, created_at) VALUES ('old', ?, 1, 1.0)", (e,)
    )
    conn.execute(
        "INSERT INTO images(sha256, original_name, path, state, cluster_id, distance, embedding,"
        " added_at, updated_at) VALUES ('s1', 'a.jpg', '/lib/old/a.jpg', 'sorted', 1, 0.5, ?,"
        " 1.0, 1.0)",
        (e,),
    )
    conn.execute(
        "INSERT INTO fits(at, n, k, silhouette, scores, moved, duration_s, trigger)"
        " VALUES (1.0, 1, 1, NULL, '{}', 0, 0.1, 'startup')"
    )
    conn.execute("INSERT INTO meta VALUES ('model_sha256', 'abc')")
    conn.close()
    db.chmod(0o644)


def test_migrates_a_v1_database(db: Path) -> None:
    _make_v1(db)
    with pytest.raises(StoreError, match=f"1 and needs migrating to {schema.SCHEMA_VERSION}"):
        open_store(db, readonly=True)
    with open_store(db) as store:
        row = store.get_image(1)
        assert row is not None and row.path == Path("/lib/old/a.jpg") and row.cluster_id == 1
        assert row.embedding is not None and np.array_equal(row.embedding, vec(1))
        assert [c.folder for c in store.clusters()] == ["old"]
        fit = store.last_fit()
        assert fit is not None and fit.trigger == "startup"
        assert (fit.rule, fit.runner_up, fit.margin) == (None, None, None)  # step 4: unknown
        assert store.get_meta("model_sha256") == "abc"
        # The step-2 table exists and works.
        mid = store.begin_move(1, "/lib/old/a.jpg", "/lib/new/a.jpg")
        store.finish_move(mid, row.filing)
        moved = store.get_image(1)
        assert moved is not None and moved.path == Path("/lib/new/a.jpg")
        assert moved.filing == Filing.sorted_into(1, 0.5)
        assert store.integrity_check() == "ok"
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    raw.close()
    assert _mode(db) == 0o600


def test_refuses_newer_and_foreign_databases(db: Path, tmp_path: Path) -> None:
    open_store(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    for ro in (False, True):
        with pytest.raises(StoreError, match=rf"version 99.*up to version {schema.SCHEMA_VERSION}"):
            open_store(db, readonly=ro)

    other = tmp_path / "other.db"
    raw = sqlite3.connect(other)
    raw.execute("CREATE TABLE t(x)")
    raw.close()
    with pytest.raises(StoreError, match="not a segd state database"):
        open_store(other)

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        open_store(junk)


def test_readonly(db: Path) -> None:
    with pytest.raises(StoreError, match="no state database"):
        open_store(db, readonly=True)
    assert not db.exists()  # read-only never creates
    with open_store(db) as w:
        iid = w.add_image("a", "a", "/a", "sorted", embedding=vec(1))
        with open_store(db, readonly=True) as r:  # while the writer holds the file open
            row = r.get_image(iid)
            assert row is not None and np.array_equal(row.embedding, vec(1))
            w.set_meta("later", "1")
            assert r.get_meta("later") == "1"  # sees new commits
            with pytest.raises(StoreError, match="read-only"):
                r.add_image("b", "b", "/b", "pending")
            with pytest.raises(StoreError, match="read-only"):
                r.set_meta("x", "y")
    with open_store(db, readonly=True) as r:  # writer gone, WAL checkpointed away
        assert r.count_by_state()["sorted"] == 1


# --------------------------------------------------------------------------- processes

# A stand-in for the daemon's writer: on start it recovers as the daemon would (finishes the
# journaled move, moves any image left pending), then adds images forever. Each image is one
# transaction (image + cluster size + counter in meta) followed by a journaled move.
_WRITER = """
import sys
from pathlib import Path
import numpy as np
from segd.state.store import Filing, open_store

s = open_store(Path(sys.argv[1]))
clusters = s.clusters()
cid = clusters[0].id if clusters else s.add_cluster("c", np.zeros(1280))

def done(iid):  # the path is the journaled dst, /lib/c/<iid>.jpg
    return Filing.sorted_into(cid, float(iid))

for m in s.pending_moves():
    s.finish_move(m.id, done(m.image_id))
for img in list(s.iter_images("pending")):
    s.finish_move(s.begin_move(img.id, img.path, f"/lib/c/{img.id}.jpg"), done(img.id))
print("ready", flush=True)
while True:
    with s.transaction():
        n = int(s.get_meta("n", "0")) + 1
        iid = s.add_image(f"{n:064x}", f"{n}.jpg", f"/inbox/{n}.jpg", "pending",
                          embedding=np.full(1280, n, np.float32))
        assert iid == n
        s.update_cluster(cid, size=s.get_cluster(cid).size + 1)
        s.set_meta("n", str(n))
    mid = s.begin_move(iid, f"/inbox/{n}.jpg", f"/lib/c/{n}.jpg")
    s.finish_move(mid, done(iid))
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"writer failed to start (rc={proc.poll()})"


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


def _check_invariants(db: Path) -> int:
    """Everything a committed prefix of the writer's work implies; returns images written."""
    # The kill may have come before the file existed (round 0): opening creates it then.
    with open_store(db) as store:
        assert store.integrity_check() == "ok"
        n = int(store.get_meta("n", "0"))
        images = list(store.iter_images())
        clusters = store.clusters()
        moves = store.pending_moves()
    assert [im.id for im in images] == list(range(1, n + 1))  # no lost or extra image
    if n:
        assert [c.size for c in clusters] == [n]  # cluster update committed with the image
    pending = [im for im in images if im.state == "pending"]
    assert len(pending) <= 1 and len(moves) <= 1
    for im in images:
        assert im.embedding is not None and np.all(im.embedding == im.id)
        assert im.sha256 == f"{im.id:064x}"
        if im.state == "sorted":
            assert im.path == Path(f"/lib/c/{im.id}.jpg") and im.distance == im.id
        else:
            assert im.id == n and im.path == Path(f"/inbox/{n}.jpg") and im.cluster_id is None
    if moves:  # journal row committed, image not yet updated: both halves of one step
        [m] = moves
        assert [p.id for p in pending] == [m.image_id]
        assert m.src == pending[0].path and m.dst == Path(f"/lib/c/{m.image_id}.jpg")
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    raw.close()
    return n


def test_survives_sigkill_at_random_moments(db: Path) -> None:
    rng = random.Random(20240531)
    written = []
    for round_ in range(6):
        proc = _spawn(_WRITER, str(db))
        if round_ == 0:
            # The first kill may land while the file is created and migrated.
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            _wait_ready(proc)
            time.sleep(rng.uniform(0.02, 0.4))
        _kill(proc)
        written.append(_check_invariants(db))
    assert written == sorted(written) and written[-1] > 0
    # The last round's recovery left nothing behind when a writer restarts cleanly.
    proc = _spawn(_WRITER, str(db))
    _wait_ready(proc)
    _kill(proc)
    _check_invariants(db)


def test_reader_in_another_process_sees_whole_transactions(db: Path) -> None:
    proc = _spawn(_WRITER, str(db))
    try:
        _wait_ready(proc)
        with open_store(db, readonly=True) as r:
            seen = set()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                with r.snapshot():
                    n = int(r.get_meta("n", "0"))
                    counts = r.count_by_state()
                    [c] = r.clusters()
                    ids, emb = r.load_embeddings()
                assert sum(counts.values()) == n == c.size == len(ids)
                assert np.array_equal(emb[:, 0], ids.astype(np.float32))
                seen.add(n)
        assert len(seen) > 1  # the writer really was committing while we read
    finally:
        _kill(proc)


_INCREMENTER = """
import sys
from pathlib import Path
from segd.state.store import open_store

s = open_store(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    with s.transaction():
        s.set_meta("count", str(int(s.get_meta("count", "0")) + 1))
s.close()
"""


def test_concurrent_writers_wait_instead_of_failing(db: Path) -> None:
    # The daemon's lock file keeps a second writer away; should one slip through anyway,
    # BEGIN IMMEDIATE + busy_timeout serialise the two and no update is lost.
    open_store(db).close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _INCREMENTER, str(db), "100"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _wait_ready(p)
    for p in procs:  # start both together
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    for p in procs:
        assert p.wait(timeout=60) == 0
        assert p.stdout is not None
        p.stdout.close()
    with open_store(db, readonly=True) as r:
        assert r.get_meta("count") == "200"
