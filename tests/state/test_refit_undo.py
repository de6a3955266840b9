"""Undoing a refit on a real store and real files: exact restoration, or a refusal that
changes nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from small_library import SmallLibrary as Lib

from segd.core.filing import Filing
from segd.state.mover import MovePlan, journaled_moves
from segd.state.reconcile import reconcile, resolve_cluster_folder
from segd.state.undo import UndoRefused, undo_last_refit, undo_point


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[Lib]:
    world = Lib.pets(tmp_path)
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


def test_only_the_last_refit_keeps_its_undo_point(lib: Lib) -> None:
    first = lib.refit()
    assert lib.store.refit_moves(first)
    with undo_point(lib.store) as second:
        lib.store.update_cluster(lib.cid["cats"], centroid=lib.unit())
    assert lib.store.refit_moves(first) == [] and lib.store.clusters_before(first) == []
    point = lib.store.last_refit()
    assert point is not None and point.id == second
