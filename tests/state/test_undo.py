"""Undoing a refit on a real store and real files: exact restoration, or a refusal that
changes nothing."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segd.config import Config, check_folders_writable, validate
from segd.core.filing import Filing
from segd.core.library import safe_folder
from segd.state.mover import MovePlan, journaled_moves
from segd.state.reconcile import reconcile, resolve_cluster_folder
from segd.state.store import open_store
from segd.state.undo import UndoRefused, undo_last_refit, undo_point

DIM = 1280


class Lib:
    def __init__(self, root: Path) -> None:
        self.config = validate(Config(inbox=root / "inbox", library=root / "library",
                                      quarantine=root / "quarantine", state_dir=root / "state"))
        check_folders_writable(self.config)
        self.store = open_store(self.config.db_path)
        self.rng = np.random.default_rng(3)
        self.cid: dict[str, int] = {}

    def unit(self) -> np.ndarray:
        x = self.rng.standard_normal(DIM)
        return (x / np.linalg.norm(x)).astype(np.float32)

    def cluster(self, folder: str, count: int) -> None:
        self.cid[folder] = self.store.add_cluster(folder, self.unit())
        resolve_cluster_folder(self.store, self.config.library, self.cid[folder])
        for i in range(count):
            path = self.config.library / folder / f"{folder}{i}.jpg"
            data = self.rng.bytes(100)
            path.write_bytes(data)
            self.store.add_image(hashlib.sha256(data).hexdigest(), path.name, path, "sorted",
                                 embedding=self.unit(), cluster_id=self.cid[folder],
                                 distance=0.25)
        self.store.recount_cluster_sizes()

    def members(self, folder: str) -> list[int]:
        return [r.id for r in self.store.iter_images() if r.cluster_id == self.cid[folder]]

    def refit(self) -> int:
        """What a refit's apply step does, under an undo point: a centroid moves, a cluster
        is created and one retired, files move between folders."""
        store, library = self.store, self.config.library
        with undo_point(store) as refit_id:
            with store.transaction():
                store.update_cluster(self.cid["dogs"], centroid=self.unit())
                new = store.add_cluster("cluster-04", self.unit())
                store.update_cluster(self.cid["panda"], retired_at=time.time())
            to_new = resolve_cluster_folder(store, library, new)
            cats = resolve_cluster_folder(store, library, self.cid["cats"])
            plans = []
            for iid in self.members("dogs")[:2]:
                row = store.get_image(iid)
                assert row is not None
                plans.append(MovePlan(iid, row.path, to_new, row.original_name,
                                      Filing.sorted_into(new, 0.1)))
            for iid in self.members("panda"):
                row = store.get_image(iid)
                assert row is not None
                plans.append(MovePlan(iid, row.path, cats, row.original_name,
                                      Filing.sorted_into(self.cid["cats"], 0.2)))
            assert all(isinstance(o, Path) for o in journaled_moves(store, plans))
            store.recount_cluster_sizes()
            safe_folder(library, "panda").rmdir()
        return refit_id

    def picture(self) -> dict[str, Any]:
        """Everything undo must restore: files (inode, bytes), folders (by name: a folder
        made again is another inode), rows, clusters."""
        files: dict[str, Any] = {}
        for p in sorted(self.config.library.rglob("*")):
            files[str(p)] = ((os.lstat(p).st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
                             if p.is_file() else "dir")
        return {
            "files": files,
            "images": [(r.id, r.path, r.filing) for r in self.store.iter_images()],
            "clusters": [(c.id, c.folder, c.centroid.tobytes(), c.size, c.active, c.origin)
                         for c in self.store.clusters(active_only=False)
                         if c.folder != "cluster-04"],
            "active": [c.folder for c in self.store.clusters()],
        }


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[Lib]:
    world = Lib(tmp_path)
    world.cluster("dogs", 5)
    world.cluster("cats", 4)
    world.cluster("panda", 3)
    reconcile(world.store, world.config, embed=lambda paths: [])
    yield world
    world.store.close()


def test_undo_restores_placement_and_clusters_exactly(lib: Lib) -> None:
    before = lib.picture()
    refit_id = lib.refit()
    assert lib.picture() != before
    assert len(lib.store.refit_moves(refit_id)) == 5
    report = undo_last_refit(lib.store, lib.config)
    assert report.moved_back == 5
    assert report.restored == ["panda"] and report.retired == ["cluster-04"]
    assert lib.picture() == before
    assert not (lib.config.library / "cluster-04").exists()
    assert lib.store.pending_moves() == []
    with pytest.raises(UndoRefused, match="already been undone"):
        undo_last_refit(lib.store, lib.config)
    # The restored folder was made again: a rename of it is still followed.
    os.rename(lib.config.library / "panda", lib.config.library / "pandas")
    assert "forgotten" not in reconcile(lib.store, lib.config, embed=lambda paths: [])
    panda = lib.store.get_cluster(lib.cid["panda"])
    assert panda is not None and panda.folder == "pandas" and panda.active


def test_moves_outside_an_undo_point_are_not_a_refits(lib: Lib) -> None:
    refit_id = lib.refit()
    row = lib.store.get_image(lib.members("cats")[0])
    assert row is not None
    journaled_moves(lib.store, [MovePlan(row.id, row.path, row.path.parent, "x.jpg",
                                         row.filing)])
    assert len(lib.store.refit_moves(refit_id)) == 5


def _refused(lib: Lib, match: str) -> None:
    after = lib.picture()
    with pytest.raises(UndoRefused, match=match):
        undo_last_refit(lib.store, lib.config)
    assert lib.picture() == after  # a refusal touches nothing


def test_no_refit_or_a_first_fit_cannot_be_undone(tmp_path: Path) -> None:
    world = Lib(tmp_path)
    try:
        with pytest.raises(UndoRefused, match="no refit to undo"):
            undo_last_refit(world.store, world.config)
        with undo_point(world.store):
            world.store.add_cluster("cluster-01", world.unit())
        with pytest.raises(UndoRefused, match="first fit"):
            undo_last_refit(world.store, world.config)
    finally:
        world.store.close()


def test_undo_refuses_when_a_moved_files_bytes_changed(lib: Lib) -> None:
    refit_id = lib.refit()
    moved = lib.store.refit_moves(refit_id)[0]
    moved.dst.write_bytes(b"edited by the user")
    _refused(lib, "bytes changed")


def test_undo_refuses_after_a_new_arrival_in_an_affected_folder(lib: Lib) -> None:
    lib.refit()
    path = lib.config.library / "cats" / "new.jpg"
    path.write_bytes(b"arrived")
    lib.store.add_image("f" * 64, "new.jpg", path, "sorted", embedding=lib.unit(),
                        cluster_id=lib.cid["cats"], distance=0.3)
    _refused(lib, "new.jpg: arrived in cats since the refit")


def test_undo_refuses_after_the_user_moved_files(lib: Lib) -> None:
    refit_id = lib.refit()
    moved = lib.store.refit_moves(refit_id)[-1]
    os.rename(moved.dst, lib.config.library / "dogs" / moved.dst.name)
    _refused(lib, "moved by you since the refit")


def test_undo_refuses_when_an_old_place_is_taken(lib: Lib) -> None:
    refit_id = lib.refit()
    moved = lib.store.refit_moves(refit_id)[0]
    moved.src.write_bytes(b"someone else's photo")
    _refused(lib, "old place is taken")


def test_what_the_user_did_before_the_refit_is_not_undone(lib: Lib) -> None:
    """A refit reconciles first, inside its undo point: undo keeps the user's work."""
    library = lib.config.library
    (library / "mine").mkdir()
    first_cat = lib.store.get_image(lib.members("cats")[0])
    assert first_cat is not None
    os.rename(first_cat.path, library / "mine" / first_cat.path.name)
    with undo_point(lib.store):
        reconcile(lib.store, lib.config, embed=lambda paths: [])
        dogs = resolve_cluster_folder(lib.store, library, lib.cid["dogs"])
        row = lib.store.get_image(lib.members("cats")[1])
        assert row is not None
        journaled_moves(lib.store, [MovePlan(row.id, row.path, dogs, row.original_name,
                                             Filing.sorted_into(lib.cid["dogs"], 0.1))])
    mine = next(c for c in lib.store.clusters() if c.folder == "mine")
    undo_last_refit(lib.store, lib.config)
    kept = lib.store.get_cluster(mine.id)
    assert kept is not None and kept.active and kept.origin == "user"
    moved_back = lib.store.get_image(row.id)
    assert moved_back is not None and moved_back.path == row.path
    pinned = lib.store.get_image(first_cat.id)
    assert pinned is not None and pinned.pinned and pinned.cluster_id == mine.id


def test_a_refit_that_changed_nothing_leaves_the_last_one_undoable(lib: Lib) -> None:
    refit_id = lib.refit()
    with undo_point(lib.store):
        pass  # a refit that kept every cluster and moved nothing
    point = lib.store.last_refit()
    assert point is not None and point.id == refit_id
    assert undo_last_refit(lib.store, lib.config).refit_id == refit_id
