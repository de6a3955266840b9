"""Re-fit: cluster every stored embedding again while keeping cluster identities stable.

Split in two so the daemon can run the expensive half off the intake path:
`compute_refit` reads a consistent snapshot through its own read-only connection and fits
(seconds to a minute, nothing locked); `apply_refit` swaps the centroids in, creates and
retires clusters, and re-files images (short, under the daemon's intake lock).

Identity: new centroids are matched one-to-one to the old ones (cosine distance, capped);
a matched cluster keeps its id and its folder, whatever name the user gave it. New clusters
get new folders; unmatched old clusters are retired, never renumbered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segd.config import Config
from segd.core.cluster import FitCancelled, FitParams, FitResult, assign, fit_stream, match_clusters
from segd.core.errors import SegdError
from segd.core.filing import Filing
from segd.core.library import cluster_folder_name, safe_folder
from segd.state.mover import MovePlan, journaled_move
from segd.state.reconcile import reconcile, resolve_cluster_folder
from segd.state.store import Store, open_store
from segd.state.undo import undo_point

log = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^cluster-(\d+)$")


@dataclass
class RefitReport:
    trigger: str
    n: int = 0
    k: int = 0
    scores: dict[int, float] = field(default_factory=dict)
    silhouette: float | None = None
    kept: int = 0  # clusters matched to an existing one
    created: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    moved: int = 0  # files re-filed (or, for a dry run, that would be)
    sorted_pending: int = 0
    dry_run: bool = False
    fit_seconds: float = 0.0
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was done

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = {str(k): v for k, v in self.scores.items()}
        return d

    def summary(self) -> str:
        if self.skipped:
            return f"refit ({self.trigger}) skipped: {self.skipped}"
        tried = ", ".join(f"{k}:{s:.3f}" for k, s in sorted(self.scores.items()))
        sil = f"{self.silhouette:.3f}" if self.silhouette is not None else "n/a"
        verb = "would move" if self.dry_run else "moved"
        return (f"refit ({self.trigger}{', dry run' if self.dry_run else ''}): n={self.n} "
                f"k={self.k} silhouette={sil} [{tried}] kept={self.kept} "
                f"new={len(self.created)} retired={len(self.retired)} {verb}={self.moved} "
                f"files, pending sorted={self.sorted_pending}, fit {self.fit_seconds:.1f}s, "
                f"total {self.seconds:.1f}s")


@dataclass
class RefitPlan:
    fit: FitResult
    n: int
    mapping: dict[int, int]  # new cluster index -> existing cluster id


def run_refit(store: Store, config: Config, params: FitParams, trigger: str, *,
              dry_run: bool = False,
              swap_lock: contextlib.AbstractContextManager[Any] | None = None,
              on_swapped: Callable[[], None] | None = None,
              cancel: threading.Event | None = None) -> RefitReport:
    """Fit (nothing locked), then apply under `swap_lock` and record the fit.

    `cancel` set before the apply step begins: nothing is applied (the daemon is stopping
    and does not wait for a fit; nothing has been written before the apply step)."""
    report = RefitReport(trigger=trigger, dry_run=dry_run)
    started = time.perf_counter()
    if cancel is not None and cancel.is_set():
        report.skipped = "stopping"
        return report
    try:
        plan = compute_refit(config, params, should_stop=cancel.is_set if cancel else None)
    except FitCancelled:
        report.skipped = "stopping; the fit was abandoned"
        log.info("%s", report.summary())
        return report
    if plan is None:
        report.skipped = "fewer than 2 images with embeddings"
        return report
    with swap_lock or contextlib.nullcontext():
        if cancel is not None and cancel.is_set():
            report.skipped = "stopping; the new fit was not applied"
            log.info("%s", report.summary())
            return report
        with contextlib.nullcontext() if dry_run else undo_point(store):  # for `segd undo`
            apply_refit(store, config, plan, report)
        if not dry_run:
            store.record_fit(plan.n, plan.fit.k, plan.fit.silhouette, plan.fit.scores,
                             report.moved, time.perf_counter() - started, trigger)
            if on_swapped is not None:
                on_swapped()
    report.seconds = time.perf_counter() - started
    log.info("%s", report.summary())
    return report


def compute_refit(config: Config, params: FitParams,
                  should_stop: Callable[[], bool] | None = None) -> RefitPlan | None:
    """Fit over a consistent snapshot of all stored embeddings; None if too few."""
    reader = open_store(config.db_path, readonly=True)
    try:
        with reader.snapshot():
            n = sum(len(ids) for ids, _ in reader.iter_embedding_chunks(state=None))
            if n < 2:
                return None

            def chunks() -> Iterator[np.ndarray]:
                return (emb for _, emb in reader.iter_embedding_chunks(state=None))

            result = fit_stream(chunks, n, params, should_stop)
            old_ids, old_centroids = reader.centroid_matrix()
    finally:
        reader.close()
    pairs = match_clusters(old_centroids, result.centroids,
                           config.clustering.match_max_distance)
    mapping = {new: int(old_ids[old]) for new, old in pairs.items()}
    return RefitPlan(fit=result, n=n, mapping=mapping)


def apply_refit(store: Store, config: Config, plan: RefitPlan, report: RefitReport) -> None:
    """Swap the new clusters in and re-file images; fills `report`."""
    fit = plan.fit
    report.n, report.k = plan.n, fit.k
    report.scores, report.silhouette = fit.scores, fit.silhouette
    report.fit_seconds = fit.duration_s
    report.kept = len(plan.mapping)

    active = {c.id: c for c in store.clusters(active_only=True)}
    new_ids = np.zeros(fit.k, dtype=np.int64)
    if report.dry_run:
        new_ids[:] = [plan.mapping.get(j, -1 - j) for j in range(fit.k)]
        report.created = [f"(new cluster {j + 1})" for j in range(fit.k) if j not in plan.mapping]
        report.retired = [c.folder for cid, c in active.items()
                          if cid not in plan.mapping.values()]
    else:
        # Follow what a user did in the library since segd last looked (folders renamed,
        # photos moved between folders or deleted): re-filing works from the stored paths
        # and must neither recreate an old folder name nor lose track of a moved photo.
        changes = reconcile(store, config)
        if changes:
            log.info("before re-filing: %s", changes)
        active = {c.id: c for c in store.clusters(active_only=True)}
        taken = _taken_folder_names(store, config.library)
        with store.transaction():
            for j in range(fit.k):
                if j in plan.mapping:
                    new_ids[j] = plan.mapping[j]
                    store.update_cluster(int(new_ids[j]), centroid=fit.centroids[j])
                else:
                    folder = _next_folder_name(taken)
                    taken.add(folder)
                    new_ids[j] = store.add_cluster(folder, fit.centroids[j])
                    report.created.append(folder)
            for cid, cluster in active.items():
                if cid not in plan.mapping.values():
                    store.update_cluster(cid, retired_at=time.time())
                    report.retired.append(cluster.folder)

    report.moved, report.sorted_pending = _refile(store, config, fit.centroids, new_ids,
                                                  move_sorted=config.clustering.on_refit == "move",
                                                  dry_run=report.dry_run)
    if not report.dry_run:
        store.recount_cluster_sizes()
        _remove_empty_retired_folders(store, config.library, report.retired)


def _refile(store: Store, config: Config, centroids: np.ndarray, new_ids: np.ndarray, *,
            move_sorted: bool, dry_run: bool) -> tuple[int, int]:
    """Move each image whose cluster changed (and every pending one) to its folder."""
    # Resolving creates each target folder and records its identity, so that a later
    # rename by the user is recognised (and followed) rather than the old name recreated.
    folders: dict[int, Path] = {}
    if not dry_run:
        for cid in sorted({int(t) for t in new_ids}):
            try:
                folders[cid] = resolve_cluster_folder(store, config.library, cid)
            except SegdError as exc:  # e.g. replaced by a symlink: its files stay put
                log.warning("%s", exc)
    moved = pending_sorted = 0
    plans: list[MovePlan] = []
    # Plans are collected first (a few fields each; the embeddings are not kept), so the
    # moves do not disturb the paged read.
    for image in store.iter_images():
        if image.embedding is None or image.state not in ("sorted", "pending"):
            continue
        label, dist = assign(image.embedding[None, :], centroids)
        target = int(new_ids[label[0]])
        if image.state == "pending":
            pending_sorted += 1
        elif image.cluster_id == target or not move_sorted:
            continue
        elif os.path.islink(image.path.parent):
            # Its folder was replaced by a link to somewhere else: never move files out of
            # a place segd does not own.
            log.warning("%s: its folder is a symbolic link; not re-filed", image.path)
            continue
        else:
            moved += 1
        if dry_run:
            continue
        if target not in folders:
            continue
        filing = Filing.sorted_into(target, float(dist[0]))
        plans.append(MovePlan(image.id, image.path, folders[target], image.original_name,
                              filing))
    for plan in plans:
        try:
            journaled_move(store, plan)
        except FileNotFoundError:
            log.warning("%s vanished before it could be re-filed; forgetting it", plan.src)
            store.delete_image(plan.image_id)
        except OSError as exc:
            # The library is full or read-only: this file stays where it is (its row still
            # says so) and the rest of the refit goes on; the next refit tries it again.
            log.warning("%s could not be re-filed (%s); it stays where it is", plan.src, exc)
    return moved, pending_sorted


def _taken_folder_names(store: Store, library: Path) -> set[str]:
    names = {c.folder for c in store.clusters(active_only=False)}
    if library.is_dir():
        names.update(p.name for p in library.iterdir())
    return names


def _next_folder_name(taken: set[str]) -> str:
    numbers = [int(m.group(1)) for name in taken if (m := _NUMBERED.match(name))]
    number = max(numbers, default=0) + 1
    while cluster_folder_name(number) in taken:
        number += 1
    return cluster_folder_name(number)


def _remove_empty_retired_folders(store: Store, library: Path, retired: list[str]) -> None:
    for folder in retired:
        path = safe_folder(library, folder)
        with contextlib.suppress(OSError):
            path.rmdir()  # only succeeds when empty: never deletes a user's file
