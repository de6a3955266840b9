"""A small library on real files and a real store, for the tests of what users do in it:
three clusters of random-byte photos, and a stand-in for a refit's apply step."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from segd.config import Config, validate
from segd.core.filing import Filing
from segd.core.library import safe_folder
from segd.state.folders import check_folders_writable
from segd.state.mover import MovePlan, journaled_moves
from segd.state.reconcile import reconcile, resolve_cluster_folder
from segd.state.store import open_store
from segd.state.undo import undo_point

DIM = 1280


class SmallLibrary:
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

    @classmethod
    def pets(cls, root: Path) -> SmallLibrary:
        """dogs (5), cats (4) and panda (3), seen once by segd (identities recorded)."""
        world = cls(root)
        world.cluster("dogs", 5)
        world.cluster("cats", 4)
        world.cluster("panda", 3)
        reconcile(world.store, world.config, embed=lambda paths: [])
        return world
