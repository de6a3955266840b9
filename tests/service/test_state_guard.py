"""The state folder's probe and the settling after a pause, on a real small tmpfs (skipped
where mounting is not allowed; CI runs as root): a ballast file fills it, a remount makes
it read-only, and a journaled batch of moves has its closing commit really fail for lack
of space, then settled once the space is back."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from reliability_env import fill_up, remount, tmpfs

from segd.config import load_config
from segd.core.errors import StoreError
from segd.core.filing import Filing
from segd.core.state_health import classify
from segd.service.state_guard import (
    PROBE_NAME,
    look_at_state_dir,
    probe_state,
    probe_state_dir,
    settle_interrupted,
)
from segd.state.mover import MovePlan, journaled_moves
from segd.state.store import Store, open_store


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "state", "4m") as path:
        yield path


def test_probe_full_read_only_and_back(state: Path) -> None:
    """The probe (writes) and the look at the start (statvfs only) agree on each state."""
    assert probe_state_dir(state) is None and look_at_state_dir(state) is None
    assert not (state / PROBE_NAME).exists()
    ballast = fill_up(state, "ballast.bin")
    for found in (probe_state_dir(state), look_at_state_dir(state)):
        assert found is not None and found.kind == "full", found
    assert not (state / PROBE_NAME).exists()
    ballast.unlink()
    assert probe_state_dir(state) is None and look_at_state_dir(state) is None
    remount(state, "ro")
    try:
        for found in (probe_state_dir(state), look_at_state_dir(state)):
            assert found is not None and found.kind == "read-only", found
    finally:
        remount(state, "rw")
    assert probe_state_dir(state) is None and look_at_state_dir(state) is None


def _config(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"inbox: {tmp_path / 'inbox'}\nlibrary: {tmp_path / 'library'}\n"
                    f"quarantine: {tmp_path / 'quarantine'}\nstate_dir: {state}\n",
                    encoding="utf-8")
    return path


def _store_with_arrivals(tmp_path: Path, state: Path, n: int) -> tuple[Store, int, list[Path]]:
    store = open_store(state / "segd.db")
    store.bind_model("0" * 64, 4)
    cid = store.add_cluster("cluster-01", np.ones(4, dtype=np.float32) / 2)
    (tmp_path / "library" / "cluster-01").mkdir(parents=True)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    paths = []
    for i in range(n):
        path = inbox / f"p{i}.jpg"
        data = f"photo {i}".encode() * 100
        path.write_bytes(data)
        store.add_image(hashlib.sha256(data).hexdigest(), path.name, path, "pending")
        paths.append(path)
    return store, cid, paths


def test_a_failed_closing_commit_is_settled_after_the_pause(
        tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal rows commit and the files are linked into the library and unlinked from
    the inbox; then the state folder fills up and the commit that closes the rows fails
    (SQLite's real SQLITE_FULL). Once there is room, `probe_state` passes and
    `settle_interrupted` completes every move: rows at their new paths, sorted, cluster
    size counted, no open journal row."""
    config = load_config(_config(tmp_path, state))
    store, cid, paths = _store_with_arrivals(tmp_path, state, 3)
    try:
        ballast: list[Path] = []
        real_finish = store.finish_moves

        def finish_on_a_full_disk(moves: list[tuple[int, Filing | None]]) -> None:
            ballast.append(fill_up(state, "ballast.bin"))  # the disk fills at exactly this moment
            real_finish(moves)

        monkeypatch.setattr(store, "finish_moves", finish_on_a_full_disk)
        plans = [MovePlan(store.find_by_path(p).id, p, config.library / "cluster-01",  # type: ignore[union-attr]
                          p.name, Filing.sorted_into(cid, 0.25)) for p in paths]
        with pytest.raises(StoreError) as caught:
            journaled_moves(store, plans)
        reason = classify(caught.value, state)
        assert reason is not None and reason.kind == "full", caught.value
        monkeypatch.undo()
        assert len(store.pending_moves()) == 3
        assert not any(p.exists() for p in paths)  # placed in the library, rows not closed
        assert probe_state(store, state) is not None  # still full

        ballast[0].unlink()
        assert probe_state(store, state) is None
        assert settle_interrupted(store, config) == 3
        assert store.pending_moves() == []
        for p in paths:
            row = store.find_by_path(config.library / "cluster-01" / p.name)
            assert row is not None and row.state == "sorted" and row.cluster_id == cid, row
            assert row.path.read_bytes() == f"photo {p.name[1]}".encode() * 100
        assert [c.size for c in store.clusters()] == [3]
    finally:
        store.close()
