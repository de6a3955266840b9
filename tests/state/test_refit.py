"""Refit and reconcile on a real store and real files, with synthetic embeddings.

Each blob is a random unit centre in 1280-d with noisy members; an image is a small file
of random bytes in the inbox with its embedding in the store, as the daemon leaves a
pending image before the first fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from segd.config import ClusteringConfig, Config, validate
from segd.core.cluster import FitParams
from segd.core.errors import StoreError
from segd.core.filing import Filing
from segd.state import reconcile
from segd.state.folders import check_folders_writable
from segd.state.refit import RefitReport, run_refit
from segd.state.store import MoveRow, open_store

DIM = 1280
PER_BLOB = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with threadpool_limits(limits=1):  # see test_cluster: much faster on a small busy box
        yield


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Library:
    """A config, its folders, an open store and helpers to add blobs of images."""

    def __init__(self, root: Path, **clustering: Any) -> None:
        # pca_dims 0: the projection is covered by test_cluster and costs 0.6 s a fit here.
        clustering = {"pca_dims": 0, "k_max": 8, **clustering}
        self.config = validate(Config(
            inbox=root / "inbox", library=root / "library", quarantine=root / "quarantine",
            state_dir=root / "state", clustering=ClusteringConfig(**clustering)))
        check_folders_writable(self.config)
        self.store = open_store(self.config.db_path)
        self.rng = np.random.default_rng(0)
        self.centres: dict[str, np.ndarray] = {}
        self.blob_of: dict[int, str] = {}

    def close(self) -> None:
        self.store.close()

    def embedding(self, blob: str) -> np.ndarray:
        if blob not in self.centres:
            self.centres[blob] = unit(self.rng.standard_normal(DIM))
        noise = self.rng.standard_normal(DIM) * (1.0 / np.sqrt(DIM))
        return unit(self.centres[blob] + noise)

    def add_blob(self, blob: str, count: int = PER_BLOB) -> list[int]:
        ids = []
        for i in range(count):
            path = self.config.inbox / f"{blob}_{i:03d}.jpg"
            data = self.rng.bytes(64) + path.name.encode()
            path.write_bytes(data)
            image_id = self.store.add_image(hashlib.sha256(data).hexdigest(), path.name, path,
                                            "pending", embedding=self.embedding(blob))
            self.blob_of[image_id] = blob
            ids.append(image_id)
        return ids

    def refit(self, *, dry_run: bool = False, config: Config | None = None,
              k: int | None = None) -> RefitReport:
        """A refit as the daemon runs one; `k`: as `segd refit --k` (it replaces)."""
        config = config or self.config
        params = FitParams.from_config(config.clustering)
        if k is not None:
            params = dataclasses.replace(params, k=k)
        return run_refit(self.store, config, params, "test", dry_run=dry_run,
                         forced=k is not None)

    def cluster_of_blob(self) -> dict[str, int]:
        """blob -> the one cluster id holding all of its images (asserts there is one)."""
        found: dict[str, set[int | None]] = {}
        for image in self.store.iter_images():
            found.setdefault(self.blob_of[image.id], set()).add(image.cluster_id)
        assert all(len(ids) == 1 for ids in found.values()), found
        mapping = {blob: next(iter(ids)) for blob, ids in found.items()}
        assert None not in mapping.values()
        assert len(set(mapping.values())) == len(mapping)  # one cluster per blob
        return mapping  # type: ignore[return-value]

    def folder_of(self, cluster_id: int) -> str:
        cluster = self.store.get_cluster(cluster_id)
        assert cluster is not None
        return cluster.folder

    def state(self) -> dict[str, Any]:
        """Everything identity-related: clusters, where each image is and what it is."""
        return {
            "clusters": [(c.id, c.folder, c.retired_at is None)
                         for c in self.store.clusters(active_only=False)],
            "images": [(im.id, im.path, im.state, im.cluster_id)
                       for im in self.store.iter_images()],
            "inodes": {im.id: os.stat(im.path).st_ino for im in self.store.iter_images()},
        }

    def check_disk_agrees(self) -> None:
        """Every image's file is where the store says; sorted ones in their cluster's folder."""
        for image in self.store.iter_images():
            assert image.path.is_file(), image.path
            assert image.path.name == image.original_name or " (" in image.path.name
            if image.state == "sorted":
                assert image.cluster_id is not None
                assert image.path.parent == self.config.library / self.folder_of(
                    image.cluster_id)
        sizes = {c.id: c.size for c in self.store.clusters(active_only=False)}
        for cid, size in sizes.items():
            assert size == sum(1 for im in self.store.iter_images()
                               if im.cluster_id == cid and im.state == "sorted")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """Where the folders and the store live: tmpfs when there is one.

    A refit journals every move with several fsyncs; on this machine's disk that is about
    1 s per refit of 36 images, on tmpfs nothing. Durability is test_store's and
    test_mover's subject, not this file's.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="segd-test-refit-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def lib(root: Path) -> Iterator[Library]:
    library = Library(root)
    yield library
    library.close()


@pytest.fixture
def fitted(lib: Library) -> Library:
    """Three blobs, filed by a first refit."""
    for blob in ("a", "b", "c"):
        lib.add_blob(blob)
    report = lib.refit()
    assert report.k == 3
    return lib


def disk_snapshot(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for root in (config.inbox, config.library, config.quarantine):
        for path in sorted(root.rglob("*")):
            st = path.lstat()
            body = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            out[str(path)] = (st.st_ino, st.st_mtime_ns, body)
    return out


def db_dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
    finally:
        conn.close()


# --------------------------------------------------------------------------- first fit


def test_first_refit_creates_clusters_and_files_pending_images(lib: Library) -> None:
    for blob in ("a", "b", "c"):
        lib.add_blob(blob)
    report = lib.refit()
    assert (report.k, report.kept, report.retired, report.moved) == (3, 0, [], 0)
    assert report.created == ["cluster-01", "cluster-02", "cluster-03"]
    assert report.sorted_pending == 3 * PER_BLOB and report.n == 3 * PER_BLOB
    assert lib.store.count_by_state() == {"pending": 0, "sorted": 3 * PER_BLOB,
                                          "quarantined": 0}
    lib.cluster_of_blob()  # each blob is exactly one cluster
    lib.check_disk_agrees()
    assert list(lib.config.inbox.iterdir()) == []
    assert sorted(p.name for p in lib.config.library.iterdir()) == report.created
    assert all(c.size == PER_BLOB for c in lib.store.clusters())
    fit = lib.store.last_fit()
    assert fit is not None and (fit.n, fit.k, fit.trigger) == (3 * PER_BLOB, 3, "test")
    # How sure the choice was, for `segd status`: the rule's own figures.
    assert fit.rule == report.rule and fit.runner_up is not None and fit.margin is not None
    assert lib.store.pending_moves() == []


def test_first_refit_with_the_default_projection(root: Path) -> None:
    lib = Library(root, pca_dims=64)
    try:
        for blob in ("a", "b", "c", "d"):
            lib.add_blob(blob)
        assert lib.refit().k == 4
        lib.cluster_of_blob()
        lib.check_disk_agrees()
    finally:
        lib.close()


def test_a_first_fit_without_structure_leaves_the_photos_waiting(root: Path) -> None:
    # 200 photos with nothing in common: from 150 photos on, and on the projection (the
    # default), the k rule can say so.
    lib = Library(root, pca_dims=32)
    try:
        _waits_without_structure(lib)
    finally:
        lib.close()


def _waits_without_structure(lib: Library) -> None:
    for i in range(200):
        path = lib.config.inbox / f"noise_{i:03d}.jpg"
        path.write_bytes(lib.rng.bytes(64))
        lib.store.add_image(hashlib.sha256(path.read_bytes()).hexdigest(), path.name, path,
                            "pending", embedding=unit(lib.rng.standard_normal(DIM)))
    disk, db = disk_snapshot(lib.config), db_dump(lib.config.db_path)
    report = lib.refit()
    assert (report.outcome, report.fit_k, report.k, report.n) == ("waiting", 1, 0, 200)
    assert "the photos wait in the inbox" in report.summary()
    assert disk_snapshot(lib.config) == disk and db_dump(lib.config.db_path) == db
    assert lib.store.clusters() == [] and lib.store.last_fit() is None


def test_refit_with_too_few_embeddings_is_skipped(lib: Library) -> None:
    lib.add_blob("a", count=1)
    report = lib.refit()
    assert report.skipped and report.k == 0
    assert lib.store.clusters() == [] and lib.store.last_fit() is None


# --------------------------------------------------------------------------- stability


def test_second_refit_keeps_ids_and_folders_and_moves_nothing(fitted: Library) -> None:
    before = fitted.state()
    report = fitted.refit()
    assert (report.k, report.kept, report.created, report.retired) == (3, 3, [], [])
    assert report.moved == 0 and report.sorted_pending == 0
    assert fitted.state() == before
    assert len(fitted.store.pending_moves()) == 0


def test_renamed_folder_keeps_its_cluster(fitted: Library) -> None:
    library = fitted.config.library
    cid = fitted.cluster_of_blob()["b"]
    old = library / fitted.folder_of(cid)
    for cluster in fitted.store.clusters():  # segd has seen the folders (as at start-up)
        reconcile.resolve_cluster_folder(fitted.store, library, cluster.id)
    os.rename(old, library / "Beach 2023")  # the user renames it
    got = reconcile.resolve_cluster_folder(fitted.store, library, cid)
    assert got == library / "Beach 2023"
    assert fitted.folder_of(cid) == "Beach 2023"
    members = [im for im in fitted.store.iter_images() if im.cluster_id == cid]
    assert len(members) == PER_BLOB
    assert all(im.path.parent == library / "Beach 2023" for im in members)
    fitted.check_disk_agrees()

    before = fitted.state()
    report = fitted.refit()
    assert (report.kept, report.created, report.moved) == (3, [], 0)
    assert fitted.state() == before
    assert not old.exists()  # the old name is not recreated


def test_folder_renamed_right_after_the_first_fit_is_followed(fitted: Library) -> None:
    # Nothing but the refit has touched the folders: it must have recorded their identity.
    library = fitted.config.library
    cid = fitted.cluster_of_blob()["a"]
    os.rename(library / fitted.folder_of(cid), library / "Holidays")
    assert reconcile.resolve_cluster_folder(fitted.store, library, cid) == library / "Holidays"
    assert reconcile.reconcile(fitted.store, fitted.config) == ""  # nothing forgotten
    assert fitted.store.count_by_state()["sorted"] == 3 * PER_BLOB
    fitted.check_disk_agrees()


def test_reconcile_follows_a_users_move_and_forgets_a_deleted_file(fitted: Library) -> None:
    clusters = fitted.cluster_of_blob()
    a_images = [im for im in fitted.store.iter_images() if im.cluster_id == clusters["a"]]
    moved, deleted = a_images[0], a_images[1]
    target = fitted.config.library / fitted.folder_of(clusters["b"])
    os.rename(moved.path, target / moved.path.name)  # the user files it under b
    deleted.path.unlink()
    assert reconcile.reconcile(fitted.store, fitted.config) == (
        "1 file(s) placed by you pinned to their folder; "
        "1 file(s) gone from the library forgotten")
    after = fitted.store.get_image(moved.id)
    assert after is not None and after.path == target / moved.path.name
    # The user's choice: filed under b and pinned there (test_reconcile has the details).
    assert (after.state, after.cluster_id, after.pinned) == ("sorted", clusters["b"], True)
    assert (after.sha256, after.original_name) == (moved.sha256, moved.original_name)
    assert fitted.store.get_image(deleted.id) is None
    sizes = {c.id: c.size for c in fitted.store.clusters()}
    assert (sizes[clusters["a"]], sizes[clusters["b"]]) == (PER_BLOB - 2, PER_BLOB + 1)


def test_filing_after_move_follows_where_dst_lies(fitted: Library) -> None:
    config, store = fitted.config, fitted.store
    cid = fitted.cluster_of_blob()["c"]
    image = next(im for im in store.iter_images() if im.cluster_id != cid)
    image = dataclasses.replace(image, reason="kept")  # a reason dst cannot tell

    def after(dst: Path) -> Filing:
        move = MoveRow(1, image.id, image.path, dst, None, "planned", 0.0)
        return reconcile.filing_after_move(store, config, move, image)

    folder = config.library / fitted.folder_of(cid)
    assert after(folder / "x.jpg") == dataclasses.replace(image.filing, cluster_id=cid)
    assert after(config.quarantine / "x.jpg") == Filing(
        "quarantined", image.cluster_id, image.distance, "kept")
    assert after(config.library / "not-a-cluster" / "x.jpg") == image.filing
    assert after(config.inbox / "x.jpg") == image.filing


def test_refit_follows_a_rename_it_was_not_told_about(fitted: Library) -> None:
    library = fitted.config.library
    cid = fitted.cluster_of_blob()["c"]
    old_name = fitted.folder_of(cid)
    os.rename(library / old_name, library / "Flowers")
    ids = fitted.add_blob("c", count=3)  # newcomers of that cluster
    report = fitted.refit()
    assert (report.kept, report.created, report.moved) == (3, [], 0)
    assert not (library / old_name).exists()
    for image_id in ids:
        image = fitted.store.get_image(image_id)
        assert image is not None and image.path.parent == library / "Flowers"
    fitted.check_disk_agrees()


# --------------------------------------------------------------------------- growth, loss


def test_new_blob_gets_a_new_cluster_and_the_old_ones_stay(fitted: Library) -> None:
    before = fitted.state()
    old_clusters = fitted.cluster_of_blob()
    new_ids = fitted.add_blob("d")
    report = fitted.refit()
    assert (report.k, report.kept, report.retired, report.moved) == (4, 3, [], 0)
    assert report.created == ["cluster-04"]
    assert report.sorted_pending == PER_BLOB
    clusters = fitted.cluster_of_blob()
    assert {b: clusters[b] for b in old_clusters} == old_clusters
    assert fitted.folder_of(clusters["d"]) == "cluster-04"
    after = fitted.state()
    for row in before["images"]:  # the old images did not move
        assert row in after["images"] and after["inodes"][row[0]] == before["inodes"][row[0]]
    for image_id in new_ids:
        image = fitted.store.get_image(image_id)
        assert image is not None and image.path.parent.name == "cluster-04"
    fitted.check_disk_agrees()


def test_vanished_blob_is_retired_not_renumbered(fitted: Library) -> None:
    clusters = fitted.cluster_of_blob()
    gone = next(b for b, cid in clusters.items() if fitted.folder_of(cid) == "cluster-02")
    for image in list(fitted.store.iter_images()):
        if fitted.blob_of[image.id] == gone:
            image.path.unlink()
            fitted.store.delete_image(image.id)
    kept = {b: (cid, fitted.folder_of(cid)) for b, cid in clusters.items() if b != gone}

    report = fitted.refit()
    assert (report.k, report.kept, report.created, report.moved) == (2, 2, [], 0)
    assert report.retired == ["cluster-02"]
    retired = fitted.store.get_cluster(clusters[gone])
    assert retired is not None and retired.retired_at is not None
    assert {b: (cid, fitted.folder_of(cid)) for b, cid in fitted.cluster_of_blob().items()} \
        == kept  # cluster-03 is still cluster-03
    assert not (fitted.config.library / "cluster-02").exists()  # it was empty
    fitted.check_disk_agrees()

    fitted.add_blob("e")  # a new cluster never takes a retired id or name
    report = fitted.refit()
    assert report.created == ["cluster-04"]
    new_cid = fitted.cluster_of_blob()["e"]
    assert new_cid > max(clusters.values())


# --------------------------------------------------------------------------- re-filing policy


def drift(lib: Library, source: str, target: str, count: int) -> list[int]:
    """Give `count` images of blob `source` embeddings of blob `target` (as a model change
    or a refit with more data would): a refit now assigns them to target's cluster."""
    moved = [im for im in lib.store.iter_images() if lib.blob_of[im.id] == source][:count]
    for image in moved:
        lib.store.record_content(image.id, image.sha256, lib.embedding(target))
    return [image.id for image in moved]


def test_on_refit_move_refiles_changed_images(fitted: Library) -> None:
    clusters = fitted.cluster_of_blob()
    changed = drift(fitted, "a", "b", 3)
    report = fitted.refit(k=3)  # a replacing refit
    assert report.outcome == "replaced"
    assert report.moved == 3 and report.kept == 3
    target = fitted.config.library / fitted.folder_of(clusters["b"])
    for image_id in changed:
        image = fitted.store.get_image(image_id)
        assert image is not None and image.cluster_id == clusters["b"]
        assert image.path.parent == target and image.path.is_file()
    fitted.check_disk_agrees()


def test_on_refit_keep_moves_nothing(root: Path) -> None:
    lib = Library(root, on_refit="keep")
    try:
        for blob in ("a", "b", "c"):
            lib.add_blob(blob)
        assert lib.refit().sorted_pending == 3 * PER_BLOB  # pending images are still filed
        drift(lib, "a", "b", 3)
        as_move = dataclasses.replace(
            lib.config, clustering=dataclasses.replace(lib.config.clustering, on_refit="move"))
        # There is something to move (for a replacing refit).
        assert lib.refit(dry_run=True, config=as_move, k=3).moved == 3
        before, disk = lib.state(), disk_snapshot(lib.config)
        report = lib.refit(k=3)
        assert report.moved == 0 and report.kept == 3
        assert lib.state() == before
        assert disk_snapshot(lib.config) == disk
    finally:
        lib.close()


# --------------------------------------------------------------------------- dry run


def test_dry_run_first_fit_changes_nothing(lib: Library) -> None:
    for blob in ("a", "b", "c"):
        lib.add_blob(blob)
    disk, db = disk_snapshot(lib.config), db_dump(lib.config.db_path)
    report = lib.refit(dry_run=True)
    assert report.dry_run and report.k == 3
    assert report.created == ["(new cluster 1)", "(new cluster 2)", "(new cluster 3)"]
    assert report.sorted_pending == 3 * PER_BLOB
    assert "would move" in report.summary()
    assert disk_snapshot(lib.config) == disk
    assert db_dump(lib.config.db_path) == db


def test_dry_run_after_changes_reports_and_changes_nothing(fitted: Library) -> None:
    drift(fitted, "a", "c", 4)
    fitted.add_blob("d")
    disk, db = disk_snapshot(fitted.config), db_dump(fitted.config.db_path)
    report = fitted.refit(dry_run=True)
    assert (report.k, report.kept, report.moved, report.sorted_pending) == (4, 3, 4, PER_BLOB)
    assert len(report.created) == 1 and report.created[0].startswith("(new cluster ")
    assert disk_snapshot(fitted.config) == disk
    assert db_dump(fitted.config.db_path) == db


# --------------------------------------------------------------------------- replace or update


def unit_mean(rows: list[np.ndarray]) -> np.ndarray:
    return unit(np.sum(rows, axis=0))


def test_an_update_moves_no_file_and_centroids_follow_their_members(fitted: Library) -> None:
    clusters = fitted.cluster_of_blob()
    drift(fitted, "a", "b", 3)  # three of a's photos now look like b's
    before, disk = fitted.state(), disk_snapshot(fitted.config)
    report = fitted.refit()
    assert (report.outcome, report.k, report.fit_k) == ("updated", 3, 3)
    assert "kept the clusters" in report.summary()
    assert (report.moved, report.created, report.retired) == (0, [], [])
    assert fitted.state() == before and disk_snapshot(fitted.config) == disk
    # Each centroid is now the mean of the photos its folder holds, drifted ones included.
    for cid in clusters.values():
        members = [im.embedding for im in fitted.store.iter_images() if im.cluster_id == cid]
        cluster = fitted.store.get_cluster(cid)
        assert cluster is not None
        assert np.allclose(cluster.centroid, unit_mean(members), atol=1e-5)
    fit = fitted.store.last_fit()
    assert fit is not None and (fit.k, fit.moved) == (3, 0)


def test_an_update_files_pending_photos_into_the_live_clusters(fitted: Library) -> None:
    clusters = fitted.cluster_of_blob()
    before = fitted.state()
    new = fitted.add_blob("b", count=4)  # arrived while no clustering was applied to them
    report = fitted.refit()
    assert (report.outcome, report.sorted_pending, report.moved) == ("updated", 4, 0)
    b_folder = fitted.config.library / fitted.folder_of(clusters["b"])
    for image_id in new:
        image = fitted.store.get_image(image_id)
        assert image is not None and image.state == "sorted" and image.path.parent == b_folder
    after = fitted.state()
    assert all(row in after["images"] for row in before["images"])  # nobody else moved
    fitted.check_disk_agrees()


def test_a_burst_of_refits_at_the_same_k_moves_nothing(fitted: Library) -> None:
    moved = 0
    for _ in range(3):
        for blob in ("a", "b", "c"):
            fitted.add_blob(blob, count=4)
        report = fitted.refit()
        assert report.outcome == "updated"
        moved += report.moved
    assert moved == 0
    fitted.cluster_of_blob()
    fitted.check_disk_agrees()


# --------------------------------------------------------------------------- pinned photos


def pin_into(lib: Library, image_id: int, cluster_id: int) -> Path:
    """The user moves the photo into the cluster's folder; segd records it pinned there."""
    image = lib.store.get_image(image_id)
    assert image is not None
    dst = lib.config.library / lib.folder_of(cluster_id) / image.path.name
    os.rename(image.path, dst)
    lib.store.file_image(image_id, dst, Filing.pinned_to(cluster_id, None))
    return dst


def test_a_replacing_refit_never_moves_a_pinned_photo(fitted: Library) -> None:
    clusters = fitted.cluster_of_blob()
    a_photos = [im.id for im in fitted.store.iter_images() if fitted.blob_of[im.id] == "a"]
    pinned, control = a_photos[0], a_photos[1]
    where = pin_into(fitted, pinned, clusters["b"])
    # The control is misfiled the same way but not pinned: the refit puts it back.
    image = fitted.store.get_image(control)
    assert image is not None
    dst = fitted.config.library / fitted.folder_of(clusters["b"]) / image.path.name
    os.rename(image.path, dst)
    fitted.store.file_image(control, dst, Filing.sorted_into(clusters["b"], 0.5))

    report = fitted.refit(k=3)
    assert report.outcome == "replaced" and report.pinned == 1
    assert report.moved == 1  # the control only
    got = fitted.store.get_image(pinned)
    assert got is not None and got.path == where and got.pinned
    assert got.cluster_id == clusters["b"] and where.is_file()
    back = fitted.store.get_image(control)
    assert back is not None and back.cluster_id == clusters["a"]
    fitted.check_disk_agrees()


def test_a_cluster_holding_a_pinned_photo_is_never_retired(fitted: Library) -> None:
    clusters = fitted.cluster_of_blob()
    c_photos = [im for im in fitted.store.iter_images() if fitted.blob_of[im.id] == "c"]
    for image in c_photos[2:]:  # c is gone but for two photos the user keeps there
        image.path.unlink()
        fitted.store.delete_image(image.id)
    for image in c_photos[:2]:
        fitted.store.file_image(image.id, image.path, Filing.pinned_to(clusters["c"], None))

    report = fitted.refit(k=2)
    assert report.outcome == "replaced" and report.retired == []
    kept = fitted.store.get_cluster(clusters["c"])
    assert kept is not None and kept.retired_at is None and kept.size == 2
    for image in c_photos[:2]:
        got = fitted.store.get_image(image.id)
        assert got is not None and got.path == image.path and got.cluster_id == clusters["c"]
    fitted.check_disk_agrees()


def test_a_cluster_the_user_made_survives_a_replacing_refit(fitted: Library) -> None:
    made = fitted.store.add_cluster("Holidays", unit(np.ones(DIM)), origin="user")
    (fitted.config.library / "Holidays").mkdir()
    report = fitted.refit(k=3)
    assert report.outcome == "replaced" and "Holidays" not in report.retired
    cluster = fitted.store.get_cluster(made)
    assert cluster is not None and cluster.retired_at is None
    fitted.cluster_of_blob()  # the blobs are where they were


# --------------------------------------------------------------------------- dry-run listing


def test_a_dry_run_lists_every_move_by_folder(fitted: Library,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from segd.commands.refit import refit_command

    clusters = fitted.cluster_of_blob()
    changed = drift(fitted, "a", "b", 2)
    fitted.add_blob("d", count=PER_BLOB)
    disk = disk_snapshot(fitted.config)
    report = fitted.refit(dry_run=True, k=4)
    a_folder, b_folder = (fitted.folder_of(clusters[b]) for b in ("a", "b"))
    moves = {(Path(m.path).name, m.source, m.target) for m in report.planned}
    names = {fitted.store.get_image(i).path.name for i in changed}  # type: ignore[union-attr]
    assert {m for m in moves if m[1] == a_folder} == {(n, a_folder, b_folder) for n in names}
    pending = [m for m in moves if m[1] == "(inbox)"]
    assert len(pending) == PER_BLOB and {m[2] for m in pending} == {"(new cluster 1)"}
    assert len(report.planned) == report.moved + report.sorted_pending
    assert disk_snapshot(fitted.config) == disk

    # The command prints the summary once, then the listing grouped by folder.
    assert refit_command(fitted.config, k=4, dry_run=True, allow_root=True) == 0
    out = capsys.readouterr().out
    assert out.count("refit (segd refit, dry run)") == 1
    assert f"  from {a_folder} (2):" in out and "  from (inbox) (12):" in out
    assert all(f"    {n} -> {b_folder}" in out for n in names)
    assert disk_snapshot(fitted.config) == disk

    assert refit_command(fitted.config, k=4, dry_run=True, allow_root=True,
                         as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dry_run"] and len(data["planned"]) == len(report.planned)


def test_the_policy_reads_the_rule_the_fit_used() -> None:
    from segd.core import kselect
    from segd.core.cluster import FitResult
    from segd.state.refit import verdict_of

    empty = np.zeros(0, np.int64)
    strength = FitResult(k=5, labels=empty, distances=empty, centroids=np.zeros((5, 4)),
                         scores={4: 0.9, 5: 0.82}, rule="strength", structured=True)
    assert verdict_of(strength).threshold == kselect.KSelect().threshold
    silhouette = dataclasses.replace(strength, rule="silhouette")
    assert verdict_of(silhouette).threshold is None
    none = dataclasses.replace(strength, k=1, structured=False)
    assert not verdict_of(none).structured and verdict_of(none).k == 1


# ---- the large fit: a sample read by id, then one pass over the store


def test_a_large_refit_reads_the_store_once_and_clusters_as_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above LARGE_FIT_ABOVE (lowered here to 500 rows, the sample to 300) compute_refit reads
    its sample by id and every row in one pass, and finds exactly what core.cluster.fit finds
    on the same rows as one in-memory matrix. Rows without an embedding and deleted rows
    leave gaps in the ids, so a sample read by position would read the wrong rows."""
    from segd.core import cluster
    from segd.state.images import ImageTable
    from segd.state.refit import compute_refit

    monkeypatch.setattr(cluster, "LARGE_FIT_ABOVE", 500)
    monkeypatch.setattr(cluster, "FIT_SAMPLE", 300)
    config = Config(state_dir=tmp_path / "state", library=tmp_path / "library",
                    clustering=ClusteringConfig(pca_dims=8, k_max=6))
    config.state_dir.mkdir()
    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((4, DIM)))
    blob_of: dict[int, int] = {}
    with open_store(config.db_path) as store, store.transaction():
        for i in range(1000):
            emb = unit(centres[i % 4] + rng.standard_normal(DIM) * (1.2 / np.sqrt(DIM)))
            image_id = store.add_image(f"{i:064x}", f"img{i}.jpg", tmp_path / f"img{i}.jpg",
                                       "pending", embedding=None if i % 7 == 3 else emb)
            blob_of[image_id] = i % 4
            if i % 11 == 5:
                store.delete_image(image_id)
    with open_store(config.db_path, readonly=True) as store:
        ids, x = store.load_embeddings(state=None)
        np.testing.assert_array_equal(store.ids_with_embeddings(), ids)
        np.testing.assert_array_equal(store.embeddings_of(ids[[0, 5, 400]], batch_rows=2),
                                      x[[0, 5, 400]])
        missing = np.setdiff1d(np.arange(1, ids[-1]), ids)[:1]  # no embedding, or deleted
        with pytest.raises(StoreError, match="have no embedding"):
            store.embeddings_of(np.concatenate([ids[:1], missing]))
    assert 500 < len(ids) < 1000

    passes: list[int] = []
    sampled: list[int] = []
    chunks, by_id = ImageTable.iter_embedding_chunks, ImageTable.embeddings_of

    def counted_chunks(self: ImageTable, *args: Any, **kw: Any) -> Iterator[Any]:
        passes.append(1)
        return chunks(self, *args, **kw)

    def counted_by_id(self: ImageTable, wanted: np.ndarray, *args: Any, **kw: Any) -> Any:
        sampled.append(len(wanted))
        return by_id(self, wanted, *args, **kw)

    monkeypatch.setattr(ImageTable, "iter_embedding_chunks", counted_chunks)
    monkeypatch.setattr(ImageTable, "embeddings_of", counted_by_id)
    params = FitParams.from_config(config.clustering)
    plan = compute_refit(config, params)
    assert plan is not None
    assert passes == [1] and sampled == [300]  # one pass; the sample by id

    monkeypatch.setattr(ImageTable, "iter_embedding_chunks", chunks)
    whole = cluster.fit(x, params)
    assert plan.fit.k == whole.k == 4
    np.testing.assert_array_equal(plan.ids, ids)
    np.testing.assert_array_equal(plan.fit.labels, whole.labels)
    np.testing.assert_allclose(plan.fit.centroids, whole.centroids, atol=1e-6)
    np.testing.assert_allclose(plan.fit.distances, whole.distances, atol=1e-6)
    assert plan.fit.scores.keys() == whole.scores.keys()
    # Every row's label is its nearest centroid, as online assignment later finds it.
    labels, distances = cluster.assign(x, plan.fit.centroids)
    np.testing.assert_array_equal(plan.fit.labels, labels)
    np.testing.assert_allclose(plan.fit.distances, distances, atol=1e-6)
    truth = np.array([blob_of[int(i)] for i in ids])
    sizes = [len(np.unique(truth[plan.fit.labels == c])) for c in range(4)]
    assert sizes == [1, 1, 1, 1]


def test_photos_that_arrive_after_the_fit_are_filed_by_their_embedding(lib: Library) -> None:
    """Re-filing walks the images without their vectors; a photo the snapshot did not hold
    (it arrived while the fit ran) has its embedding read and joins its nearest cluster,
    and one without an embedding stays where it is."""
    from segd.state.refit import apply_refit, compute_refit

    for blob in ("a", "b", "c"):
        lib.add_blob(blob)
    plan = compute_refit(lib.config, FitParams.from_config(lib.config.clustering))
    assert plan is not None
    late = [lib.store.add_image(f"{i:064x}", f"late_{i}.jpg", lib.config.inbox / f"late_{i}.jpg",
                                "pending", embedding=lib.embedding("b")) for i in range(2)]
    for i, image_id in enumerate(late):
        (lib.config.inbox / f"late_{i}.jpg").write_bytes(f"late {i}".encode())
        lib.blob_of[image_id] = "b"
    bare = lib.config.inbox / "no_vector.jpg"
    bare.write_bytes(b"not embedded yet")
    bare_id = lib.store.add_image("0" * 64, bare.name, bare, "pending")
    report = RefitReport(trigger="test")
    apply_refit(lib.store, lib.config, plan, report)
    lib.store.delete_image(bare_id)  # so that the checks below see the filed photos only
    assert report.sorted_pending == 3 * PER_BLOB + 2
    assert bare.is_file()
    assert len(lib.cluster_of_blob()) == 3  # the late ones are in b's cluster
    assert all(lib.store.get_image(i).state == "sorted" for i in late)  # type: ignore[union-attr]
    lib.check_disk_agrees()
