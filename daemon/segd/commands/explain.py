"""`segd explain FILE`: why a photo is where it is (its cluster, the runner-up, its pin)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segd.config import Config
    from segd.state.store import Store

# The store (and numpy with it) is imported only when there is one to read.


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("explain", parents=[common], help="say why a photo is where it is")
    p.add_argument("file", type=Path, help="a photo in the library, the inbox or quarantine")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


@dataclass
class Explanation:
    path: str
    known: bool
    state: str | None = None
    recorded_path: str | None = None  # where segd has it, when the file was found by bytes
    cluster: str | None = None
    cluster_id: int | None = None
    distance: float | None = None  # to its cluster's centroid now
    runner_up: str | None = None
    runner_up_id: int | None = None
    runner_up_distance: float | None = None
    pinned: bool = False
    pinned_because: str | None = None  # "moved by you from dogs to cats on 2024-05-01"
    reason: str | None = None  # why it was quarantined

    def text(self) -> str:
        if not self.known:
            return f"{self.path}: segd does not know this file"
        lines = [f"{self.path}: {self.state}"]
        if self.recorded_path:
            lines.append(f"  segd has it at {self.recorded_path} (it follows a move at the "
                         "next refit or start)")
        if self.cluster is not None:
            lines.append(f"  cluster: {self.cluster} ({self.cluster_id}), distance "
                         f"{_fmt(self.distance)}")
        if self.runner_up is not None:
            lines.append(f"  runner-up: {self.runner_up} ({self.runner_up_id}), distance "
                         f"{_fmt(self.runner_up_distance)}")
        if self.pinned:
            lines.append(f"  pinned: yes, {self.pinned_because or 'placed by you'}; no refit "
                         "moves it")
        elif self.state == "sorted":
            lines.append("  pinned: no (a refit may move it to a closer cluster)")
        if self.reason:
            lines.append(f"  reason: {self.reason}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(args: argparse.Namespace, config: Config) -> int:
    return explain_command(config, args.file, as_json=args.json)


def explain_command(config: Config, file: Path, *, as_json: bool = False) -> int:
    if not config.db_path.exists():
        print(f"segd: nothing to explain: no store at {config.db_path}")
        return 1
    from segd.state.store import open_store

    # Read-only: a reader never blocks the daemon, nor the daemon it.
    store = open_store(config.db_path, readonly=True)
    try:
        with store.snapshot():
            found = explain(store, Path(os.path.abspath(file)))
    finally:
        store.close()
    print(json.dumps(asdict(found), indent=2) if as_json else found.text())
    return 0 if found.known else 1


def explain(store: Store, path: Path) -> Explanation:
    """What the store knows of the file at ``path`` (found by its bytes if it moved)."""
    import numpy as np

    from segd.state.fsops import file_sha256

    image = store.find_by_path(path)
    out = Explanation(path=str(path), known=image is not None)
    if image is None:
        sha = file_sha256(path)
        twins = store.find_by_sha256(sha) if sha else []
        if not twins:
            return out
        image = twins[0]
        out.known, out.recorded_path = True, str(image.path)
    out.state, out.pinned, out.reason = image.state, image.pinned, image.reason
    clusters = {c.id: c for c in store.clusters(active_only=False)}
    if image.cluster_id is not None and image.cluster_id in clusters:
        out.cluster, out.cluster_id = clusters[image.cluster_id].folder, image.cluster_id
        out.distance = image.distance
    ids, centroids = store.centroid_matrix()
    if image.embedding is not None and len(ids):
        dist = np.clip(1.0 - centroids @ image.embedding, 0.0, 2.0)
        order = [int(i) for i in np.argsort(dist, kind="stable")]
        if out.cluster_id in ids.tolist():
            out.distance = float(dist[ids.tolist().index(out.cluster_id)])
        others = [i for i in order if int(ids[i]) != out.cluster_id]
        if others:
            best = others[0]
            out.runner_up_id = int(ids[best])
            out.runner_up = clusters[out.runner_up_id].folder
            out.runner_up_distance = float(dist[best])
    if image.pinned:
        moves = [c for c in store.corrections_of(image.id) if c.kind in ("moved", "added")]
        if moves:
            when = dt.datetime.fromtimestamp(moves[-1].at).strftime("%Y-%m-%d %H:%M")
            out.pinned_because = f"{moves[-1].detail} on {when}"
    return out
