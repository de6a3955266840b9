"""Following the user's work in the library: pins and user clusters in the store, and
start-up reconciliation against real folders and a real SQLite store."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from segd.config import Config, validate
from segd.core.filing import Filing
from segd.state import schema
from segd.state.folders import check_folders_writable
from segd.state.reconcile import reconcile, reconcile_library, resolve_cluster_folder
from segd.state.store import ImageRow, Store, open_store

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
    assert raw.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 4
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


# --------------------------------------------------------------------------- reconcile


class Lib:
    """A config, its folders and store, and three clusters of real files on disk."""

    def __init__(self, root: Path) -> None:
        self.config = validate(Config(inbox=root / "inbox", library=root / "library",
                                      quarantine=root / "quarantine", state_dir=root / "state"))
        check_folders_writable(self.config)
        self.store = open_store(self.config.db_path)
        self.rng = np.random.default_rng(7)
        self.centres: dict[str, np.ndarray] = {}
        self.cid: dict[str, int] = {}
        self.embedded: list[Path] = []  # what the embed function was asked to embed

    def close(self) -> None:
        self.store.close()

    def near(self, folder: str) -> np.ndarray:
        x = self.centres[folder] + self.rng.standard_normal(DIM) / np.sqrt(DIM)
        return (x / np.linalg.norm(x)).astype(np.float32)

    def cluster(self, folder: str, count: int) -> list[int]:
        centre = self.rng.standard_normal(DIM)
        self.centres[folder] = (centre / np.linalg.norm(centre)).astype(np.float32)
        cid = self.store.add_cluster(folder, self.centres[folder])
        self.cid[folder] = cid
        resolve_cluster_folder(self.store, self.config.library, cid)
        return [self.photo(folder, f"{folder}{i}.jpg") for i in range(count)]

    def photo(self, folder: str, name: str) -> int:
        path = self.config.library / folder / name
        data = self.rng.bytes(200) + name.encode()
        path.write_bytes(data)
        return self.store.add_image(_sha(data), name, path, "sorted",
                                    embedding=self.near(folder), cluster_id=self.cid[folder],
                                    distance=0.3)

    def embed(self, paths: list[Path]) -> list[tuple[str, np.ndarray] | Exception]:
        """Stands in for the network: a file named after a folder resembles it."""
        self.embedded += paths
        out: list[tuple[str, np.ndarray] | Exception] = []
        for p in paths:
            data = p.read_bytes()
            if data.startswith(b"not an image"):
                out.append(ValueError("not an image"))
            else:
                out.append((_sha(data), self.near(p.name.split("-")[0])))
        return out

    def reconcile(self) -> str:
        return reconcile(self.store, self.config, embed=self.embed)

    def path(self, rel: str) -> Path:
        return self.config.library / rel

    def image(self, image_id: int) -> ImageRow:
        row = self.store.get_image(image_id)
        assert row is not None
        return row

    def check_disk_agrees(self) -> None:
        """Every row names its file; every library file has a row."""
        rows = list(self.store.iter_images())
        assert all(r.path.is_file() for r in rows), [r.path for r in rows if not r.path.is_file()]
        on_disk = sorted(p for p in self.config.library.rglob("*") if p.is_file())
        assert sorted(r.path for r in rows) == on_disk


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[Lib]:
    world = Lib(tmp_path)
    world.cluster("dogs", 8)
    world.cluster("cats", 6)
    world.cluster("panda", 3)
    world.reconcile()  # segd has seen the library once: file identities are recorded
    yield world
    world.close()


def test_an_untouched_library_changes_nothing(lib: Lib) -> None:
    before = [(r.id, r.path, r.filing) for r in lib.store.iter_images()]
    assert lib.reconcile() == ""
    assert [(r.id, r.path, r.filing) for r in lib.store.iter_images()] == before
    assert lib.embedded == []


def test_the_users_day_in_the_library(lib: Lib) -> None:
    """Five cats out of the dog folder into the cat folder, the panda folder renamed, a
    folder of three of the user's own photos: all followed, none forgotten."""
    dogs = [r for r in lib.store.iter_images() if r.cluster_id == lib.cid["dogs"]]
    cats_in_dogs = dogs[:5]
    for r in cats_in_dogs:
        os.rename(r.path, lib.path(f"cats/{r.path.name}"))
    os.rename(lib.path("panda"), lib.path("pandas"))
    lib.path("mine").mkdir()
    mine = [dogs[5], *[r for r in lib.store.iter_images() if r.cluster_id == lib.cid["cats"]][:2]]
    for r in mine:
        os.rename(r.path, lib.path(f"mine/{r.path.name}"))

    summary = lib.reconcile()
    assert "forgotten" not in summary
    for r in cats_in_dogs:
        after = lib.image(r.id)
        assert after.pinned and after.cluster_id == lib.cid["cats"]
        assert after.path == lib.path(f"cats/{r.path.name}")
        assert lib.store.corrections_of(r.id)[-1].detail == "moved by you from dogs to cats"
    panda = lib.store.get_cluster(lib.cid["panda"])
    assert panda is not None and panda.folder == "pandas" and panda.active
    user = [c for c in lib.store.clusters() if c.origin == "user"]
    assert [c.folder for c in user] == ["mine"]
    for r in mine:
        after = lib.image(r.id)
        assert after.pinned and after.cluster_id == user[0].id
    # Its centroid is its members' mean: a photo like them is nearest to it.
    mean = np.mean([lib.store.get_image(r.id).embedding for r in mine], axis=0)  # type: ignore[union-attr]
    assert np.allclose(user[0].centroid, mean / np.linalg.norm(mean), atol=1e-5)
    assert {c.folder: c.size for c in lib.store.clusters()} == {
        "dogs": 2, "cats": 9, "pandas": 3, "mine": 3}
    lib.check_disk_agrees()
    assert lib.reconcile() == ""  # and it is all remembered


def test_a_pinned_file_is_what_the_store_hands_a_refit(lib: Lib) -> None:
    r = next(r for r in lib.store.iter_images() if r.cluster_id == lib.cid["dogs"])
    os.rename(r.path, lib.path(f"cats/{r.path.name}"))
    lib.reconcile()
    ids, _ = lib.store.load_embeddings(state="sorted")
    assert ids[lib.store.pinned_mask(ids)].tolist() == [r.id]
    assert lib.store.pinned_clusters(np.array([r.id])).tolist() == [lib.cid["cats"]]


def test_merging_retires_the_emptied_cluster_and_moves_nothing(lib: Lib) -> None:
    cats = [r for r in lib.store.iter_images() if r.cluster_id == lib.cid["cats"]]
    for r in cats:
        os.rename(r.path, lib.path(f"dogs/{r.path.name}"))
    files_before = sorted(p for p in lib.config.library.rglob("*") if p.is_file())
    assert "cats" in lib.reconcile()
    cluster = lib.store.get_cluster(lib.cid["cats"])
    assert cluster is not None and not cluster.active
    assert all(lib.image(r.id).cluster_id == lib.cid["dogs"] and lib.image(r.id).pinned
               for r in cats)
    assert sorted(p for p in lib.config.library.rglob("*") if p.is_file()) == files_before
    assert not lib.path("cats").exists()  # the emptied folder is tidied, nothing in it


def test_deleting_a_folder_follows_its_files_and_retires_it(lib: Lib) -> None:
    pandas = [r for r in lib.store.iter_images() if r.cluster_id == lib.cid["panda"]]
    os.rename(pandas[0].path, lib.path(f"dogs/{pandas[0].path.name}"))
    (lib.path("cats") / "deep").mkdir()
    os.rename(pandas[1].path, lib.path(f"cats/deep/{pandas[1].path.name}"))
    pandas[2].path.unlink()
    lib.path("panda").rmdir()
    summary = lib.reconcile()
    assert "1 file(s) gone from the library forgotten" in summary
    assert lib.image(pandas[0].id).cluster_id == lib.cid["dogs"]
    assert lib.image(pandas[1].id).path == lib.path(f"cats/deep/{pandas[1].path.name}")
    assert lib.store.get_image(pandas[2].id) is None
    cluster = lib.store.get_cluster(lib.cid["panda"])
    assert cluster is not None and not cluster.active
    assert not lib.path("panda").exists()  # not recreated
    lib.check_disk_agrees()


def test_a_copy_with_new_bytes_location_is_followed_by_sha256(lib: Lib) -> None:
    r = next(r for r in lib.store.iter_images() if r.cluster_id == lib.cid["dogs"])
    data = r.path.read_bytes()
    r.path.unlink()
    lib.path(f"panda/{r.path.name}").write_bytes(data)  # a new inode, the same bytes
    assert "forgotten" not in lib.reconcile()
    after = lib.image(r.id)
    assert after.path == lib.path(f"panda/{r.path.name}") and after.pinned
    assert lib.embedded == []  # known bytes are never embedded again


def test_photos_copied_in_from_outside_are_embedded_where_they_lie(lib: Lib) -> None:
    lib.path("mine").mkdir()
    lib.path("mine/cats-1.jpg").write_bytes(b"outside one")
    lib.path("mine/cats-2.jpg").write_bytes(b"outside two")
    lib.path("dogs/dogs-x.jpg").write_bytes(b"outside three")
    lib.path("dogs/notes.txt").write_bytes(b"not an image at all")
    summary = lib.reconcile()
    assert "3 photo(s) you added embedded where they lie" in summary
    assert "1 unreadable file(s)" in summary
    mine = lib.store.find_by_path(lib.path("mine/cats-1.jpg"))
    assert mine is not None and mine.pinned and mine.state == "sorted"
    cluster = lib.store.get_cluster(mine.cluster_id)  # type: ignore[arg-type]
    assert cluster is not None and (cluster.folder, cluster.origin) == ("mine", "user")
    x = lib.store.find_by_path(lib.path("dogs/dogs-x.jpg"))
    assert x is not None and x.cluster_id == lib.cid["dogs"] and x.pinned
    assert lib.path("dogs/notes.txt").read_bytes() == b"not an image at all"  # left alone
    assert lib.store.find_by_path(lib.path("dogs/notes.txt")) is None


def test_without_a_model_new_photos_wait_and_nothing_is_lost(lib: Lib) -> None:
    lib.path("dogs/dogs-x.jpg").write_bytes(b"outside")
    done = reconcile_library(lib.store, lib.config, None)
    assert done.waiting == 1 and "wait to be embedded" in done.summary()
    assert lib.path("dogs/dogs-x.jpg").read_bytes() == b"outside"
    assert lib.store.find_by_path(lib.path("dogs/dogs-x.jpg")) is None


def test_a_folder_replaced_by_a_symlink_is_not_retired_nor_forgotten(lib: Lib,
                                                                      tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    os.rename(lib.path("panda"), elsewhere)
    lib.path("panda").symlink_to(elsewhere)
    count = lib.store.count_by_state()["sorted"]
    lib.reconcile()
    cluster = lib.store.get_cluster(lib.cid["panda"])
    assert cluster is not None and cluster.active
    assert lib.store.count_by_state()["sorted"] == count
