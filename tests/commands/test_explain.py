"""`segd explain FILE`: the cluster, the runner-up, the pin and why, from a read-only store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from small_library import SmallLibrary

from segd.commands.explain import explain
from segd.state.reconcile import reconcile
from segd.state.store import open_store


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[SmallLibrary]:
    world = SmallLibrary.pets(tmp_path)
    yield world
    world.store.close()


def segd(lib: SmallLibrary, *args: str) -> subprocess.CompletedProcess[str]:
    c = lib.config
    path = c.state_dir.parent / "config.yaml"
    path.write_text(yaml.safe_dump({
        "inbox": str(c.inbox), "library": str(c.library), "quarantine": str(c.quarantine),
        "state_dir": str(c.state_dir), "model": {"gpu": "off"}}))
    return subprocess.run([sys.executable, "-m", "segd", *args, "--config", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_a_photo_moved_by_the_user_is_explained_as_pinned(lib: SmallLibrary) -> None:
    row = lib.store.get_image(lib.members("dogs")[0])
    assert row is not None
    moved = lib.config.library / "cats" / row.path.name
    os.rename(row.path, moved)
    reconcile(lib.store, lib.config, embed=lambda paths: [])
    done = segd(lib, "explain", str(moved), "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert (got["state"], got["cluster"], got["pinned"]) == ("sorted", "cats", True)
    assert got["pinned_because"].startswith("moved by you from dogs to cats on 20")
    assert got["runner_up"] in ("dogs", "panda")
    # The distances are the cosine distances to the centroids as they are now.
    ids, centroids = lib.store.centroid_matrix()
    dist = dict(zip(ids.tolist(), (1 - centroids @ row.embedding).tolist(), strict=True))
    assert got["distance"] == pytest.approx(dist[lib.cid["cats"]], abs=1e-5)
    assert got["runner_up_distance"] == pytest.approx(
        min(d for cid, d in dist.items() if cid != lib.cid["cats"]), abs=1e-5)
    text = segd(lib, "explain", str(moved)).stdout
    assert "pinned: yes, moved by you from dogs to cats" in text
    assert "runner-up:" in text


def test_an_ordinary_photo_is_not_pinned(lib: SmallLibrary) -> None:
    row = lib.store.get_image(lib.members("panda")[0])
    assert row is not None
    with open_store(lib.config.db_path, readonly=True) as reader:
        got = explain(reader, row.path)
    assert got.known and got.cluster == "panda" and not got.pinned
    assert got.runner_up is not None and got.runner_up != "panda"
    assert got.distance is not None and got.runner_up_distance is not None
    assert "a refit may move it" in got.text()


def test_a_file_moved_since_segd_looked_is_found_by_its_bytes(lib: SmallLibrary) -> None:
    row = lib.store.get_image(lib.members("cats")[0])
    assert row is not None
    elsewhere = lib.config.library / "dogs" / "renamed.jpg"
    os.rename(row.path, elsewhere)
    got = explain(lib.store, elsewhere)
    assert got.known and got.recorded_path == str(row.path) and got.cluster == "cats"


def test_an_unknown_file_says_so(lib: SmallLibrary, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.jpg"
    stranger.write_bytes(b"never seen")
    done = segd(lib, "explain", str(stranger))
    assert done.returncode == 1 and "does not know this file" in done.stdout
