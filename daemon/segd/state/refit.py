"""Re-fit: cluster every stored embedding again while keeping cluster identities stable.

Split in two so the daemon can run the expensive half off the intake path:
`compute_refit` reads a consistent snapshot through its own read-only connection, fits and
decides (seconds to a minute, nothing locked); `apply_refit` swaps the centroids in, creates
and retires clusters, and re-files images (short, under the daemon's intake lock).

Replace or update (segd.core.refit_policy): the new fit replaces the live clusters only when
its k rule clearly prefers its k to the live one; otherwise the live clusters stay, each
centroid becomes its members' mean, pending photos are filed, and no sorted file moves.

Pinned photos (placed by the user) never move: their cluster keeps them, even when the new
fit would retire it, and they count towards its centroid (segd.core.constrained).

Identity: new centroids are matched one-to-one to the old ones (cosine distance, capped);
a matched cluster keeps its id and its folder, whatever name the user gave it. New clusters
get new folders; unmatched old clusters are retired, never renumbered, unless the user made
them or pinned a photo in them.
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
from segd.core import kselect
from segd.core.cluster import FitCancelled, FitParams, FitResult, assign, fit_stream, match_clusters
from segd.core.constrained import FREE, constrained_kmeans_stream
from segd.core.errors import SegdError
from segd.core.filing import Filing
from segd.core.library import cluster_folder_name, safe_folder
from segd.core.refit_policy import Action, Decision, Verdict, decide
from segd.state.mover import MovePlan, journaled_move
from segd.state.reconcile import reconcile, resolve_cluster_folder
from segd.state.store import ClusterRow, ImageRow, Store, open_store
from segd.state.undo import undo_point

log = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^cluster-(\d+)$")
# Lloyd passes over every row when pinned rows hold a replacing fit, or when an update
# files pending photos into the live clusters (each pass reads the embeddings once).
CONSTRAINED_ITERS = 10
INBOX = "(inbox)"  # the source folder a pending photo is listed under


@dataclass(frozen=True)
class PlannedMove:
    """One file a refit moves (or, for a dry run, would move)."""

    path: str  # where it is now
    source: str  # its folder now: a cluster folder, or INBOX for a pending photo
    target: str  # the folder it goes to; a new cluster's is "(new cluster N)" in a dry run


@dataclass
class RefitReport:
    trigger: str
    n: int = 0
    k: int = 0  # clusters after the refit (the live ones when it only updated them)
    scores: dict[int, float] = field(default_factory=dict)
    silhouette: float | None = None
    rule: str = ""
    fit_k: int = 0  # what the fit's rule chose (1: no structure)
    outcome: str = ""  # "replaced", "updated" or "waiting" (no clusters, no structure)
    reason: str = ""  # why (refit_policy.Decision.reason)
    kept: int = 0  # clusters matched to an existing one
    created: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    moved: int = 0  # files re-filed (or, for a dry run, that would be)
    sorted_pending: int = 0
    pinned: int = 0  # pinned photos, none of which moved
    dry_run: bool = False
    fit_seconds: float = 0.0
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was done
    planned: list[PlannedMove] = field(default_factory=list)  # dry runs: every move, in order

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = {str(k): v for k, v in self.scores.items()}
        return d

    def summary(self) -> str:
        if self.skipped:
            return f"refit ({self.trigger}) skipped: {self.skipped}"
        tried = ", ".join(f"{k}:{s:.3f}" for k, s in sorted(self.scores.items()))
        sil = f"{self.silhouette:.3f}" if self.silhouette is not None else "n/a"
        head = f"refit ({self.trigger}{', dry run' if self.dry_run else ''}): n={self.n}"
        rule = f"[{self.rule or 'k rule'} chose {self.fit_k}: {tried}; silhouette {sil}]"
        timing = f"fit {self.fit_seconds:.1f}s, total {self.seconds:.1f}s"
        if self.outcome == "waiting":
            return (f"{head} no clusters: {self.reason} {rule}; the photos wait in the "
                    f"inbox; {timing}")
        would = "would have " if self.dry_run else ""
        what = (f"{would}replaced the clusters" if self.outcome == "replaced" else
                f"{would}kept the clusters, centroids updated")
        verb = "would move" if self.dry_run else "moved"
        return (f"{head} k={self.k} {what} ({self.reason}) {rule} kept={self.kept} "
                f"new={len(self.created)} retired={len(self.retired)} {verb}={self.moved} "
                f"files, pending sorted={self.sorted_pending}, pinned held={self.pinned}, "
                f"{timing}")


@dataclass
class RefitPlan:
    """What a refit applies: a clustering, and every snapshot row's place in it."""

    fit: FitResult
    n: int
    decision: Decision
    ids: np.ndarray  # (n,) image ids in ascending order (the snapshot's rows)
    labels: np.ndarray  # (n,) row -> index into `centroids`
    distances: np.ndarray  # (n,) cosine distance of each row to its centroid
    centroids: np.ndarray  # (m, d) the clusters after the refit
    cluster_ids: np.ndarray  # (m,) the existing cluster each centroid is, or -1: a new one

    @property
    def mapping(self) -> dict[int, int]:
        """Centroid index -> existing cluster id, for the centroids that keep one."""
        return {j: int(c) for j, c in enumerate(self.cluster_ids) if c >= 0}


def verdict_of(fit: FitResult) -> Verdict:
    """What the policy reads of a fit. Prediction strength is a threshold rule: k is the
    largest k whose strength reaches the threshold the fit used (kselect's)."""
    threshold = kselect.KSelect().threshold if fit.rule == "strength" else None
    return Verdict(k=fit.k, structured=fit.structured, scores=dict(fit.scores),
                   threshold=threshold, rule=fit.rule)


def run_refit(store: Store, config: Config, params: FitParams, trigger: str, *,
              dry_run: bool = False,
              swap_lock: contextlib.AbstractContextManager[Any] | None = None,
              on_swapped: Callable[[], None] | None = None,
              cancel: threading.Event | None = None, forced: bool = False) -> RefitReport:
    """Fit (nothing locked), then apply under `swap_lock` and record the fit.

    `forced`: the user asked for this fit (a fixed k): it replaces the live clusters.
    The caller reports the result (`RefitReport.summary`); this logs only what goes wrong.
    `cancel` set before the apply step begins: nothing is applied (the daemon is stopping
    and does not wait for a fit; nothing has been written before the apply step)."""
    report = RefitReport(trigger=trigger, dry_run=dry_run)
    started = time.perf_counter()
    if cancel is not None and cancel.is_set():
        report.skipped = "stopping"
        return report
    try:
        plan = compute_refit(config, params, should_stop=cancel.is_set if cancel else None,
                             forced=forced)
    except FitCancelled:
        report.skipped = "stopping; the fit was abandoned"
        return report
    if plan is None:
        report.skipped = "fewer than 2 images with embeddings"
        return report
    with swap_lock or contextlib.nullcontext():
        if cancel is not None and cancel.is_set():
            report.skipped = "stopping; the new fit was not applied"
            return report
        # An undo point for `segd undo`, unless nothing is to change.
        records = not dry_run and plan.decision.action is not Action.WAIT
        with undo_point(store) if records else contextlib.nullcontext():
            apply_refit(store, config, plan, report)
        if records:
            # How sure k was describes the fit's own k, not live clusters kept instead.
            own = report.k == plan.fit.k
            store.record_fit(plan.n, report.k, plan.fit.silhouette, plan.fit.scores,
                             report.moved, time.perf_counter() - started, trigger,
                             rule=plan.fit.rule if own else None,
                             runner_up=plan.fit.runner_up if own else None,
                             margin=plan.fit.margin if own else None)
            if on_swapped is not None:
                on_swapped()
    report.seconds = time.perf_counter() - started
    return report


def compute_refit(config: Config, params: FitParams,
                  should_stop: Callable[[], bool] | None = None, *,
                  forced: bool = False) -> RefitPlan | None:
    """Fit over a consistent snapshot of all stored embeddings and decide what to apply;
    None if too few. `forced`: the caller fixed k; the fit replaces the live clusters."""
    reader = open_store(config.db_path, readonly=True)
    try:
        with reader.snapshot():
            # The ids alone (no vector read), so that a large fit reads its sample by id
            # and every row once (core.cluster); small fits read the rows a few times.
            started = time.perf_counter()
            ids = reader.ids_with_embeddings()
            ids_s = time.perf_counter() - started
            n = len(ids)
            if n < 2:
                return None

            def chunks() -> Iterator[np.ndarray]:
                start = 0
                for chunk_ids, emb in reader.iter_embedding_chunks(state=None):
                    if not np.array_equal(chunk_ids, ids[start:start + len(chunk_ids)]):
                        raise SegdError("the store's rows changed under a refit's snapshot")
                    start += len(chunk_ids)
                    yield emb

            def take(rows: np.ndarray) -> np.ndarray:
                return reader.embeddings_of(ids[rows])

            result = fit_stream(chunks, n, params, should_stop, take=take)
            result.phases = {"ids": ids_s, **result.phases}
            live = reader.clusters(active_only=True)
            old_ids, old_centroids = reader.centroid_matrix()
            live_k = sum(1 for c in live if c.origin == "fit")
            decision = decide(verdict_of(result), live_k, forced=forced)
            if decision.action is Action.WAIT:
                return RefitPlan(result, n, decision, ids, np.zeros(n, np.int64),
                                 np.zeros(n, np.float32), old_centroids[:0], old_ids[:0])
            if decision.action is Action.UPDATE:
                # Every sorted photo stays in its cluster; pending ones join the nearest,
                # and each centroid becomes its members' mean.
                fixed = _index_of(old_ids, _sorted_into(reader, ids))
                fitted = constrained_kmeans_stream(chunks, n, old_centroids, fixed,
                                                   max_iter=CONSTRAINED_ITERS,
                                                   should_stop=should_stop)
                return RefitPlan(result, n, decision, ids, fitted.labels, fitted.distances,
                                 fitted.centroids, old_ids.copy())
            pins = reader.pinned_clusters(ids)
            centroids, cluster_ids = _replacement(config, result, old_ids, old_centroids,
                                                  live, pins)
            fixed = _index_of(cluster_ids, pins)
            if np.any(fixed != FREE) or len(cluster_ids) > result.k:
                # Pinned photos hold their clusters and pull them towards themselves.
                fitted = constrained_kmeans_stream(chunks, n, centroids, fixed,
                                                   max_iter=CONSTRAINED_ITERS,
                                                   should_stop=should_stop)
                labels, distances, centroids = (fitted.labels, fitted.distances,
                                                fitted.centroids)
            else:
                labels, distances = result.labels, result.distances
    finally:
        reader.close()
    return RefitPlan(result, n, decision, ids, labels, distances, centroids, cluster_ids)


def _sorted_into(reader: Store, ids: np.ndarray) -> np.ndarray:
    """For each id (ascending): the cluster it is sorted into, -1 (FREE) where none."""
    return reader.sorted_clusters(ids)


def _index_of(cluster_ids: np.ndarray, per_row: np.ndarray) -> np.ndarray:
    """Per row: the position of its cluster id in `cluster_ids`, FREE where absent or -1."""
    out = np.full(len(per_row), FREE, dtype=np.int64)
    if len(cluster_ids) == 0:
        return out
    order = np.argsort(cluster_ids)
    pos = np.searchsorted(cluster_ids[order], per_row)
    pos[pos == len(order)] = 0
    hit = (per_row >= 0) & (cluster_ids[order][pos] == per_row)
    out[hit] = order[pos[hit]]
    return out


def _replacement(config: Config, fit: FitResult, old_ids: np.ndarray,
                 old_centroids: np.ndarray, live: list[ClusterRow],
                 pins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The new fit's centroids matched to live clusters, plus every live cluster that must
    stay although nothing matched it (the user's, or one holding pinned photos)."""
    pairs = match_clusters(old_centroids, fit.centroids, config.clustering.match_max_distance)
    cluster_ids = np.array([int(old_ids[pairs[j]]) if j in pairs else -1
                            for j in range(fit.k)], dtype=np.int64)
    must_stay = {int(c) for c in np.unique(pins[pins >= 0])}
    must_stay |= {c.id for c in live if c.origin == "user"}
    extra = [i for i, cid in enumerate(old_ids)
             if int(cid) in must_stay and int(cid) not in set(cluster_ids.tolist())]
    if not extra:
        return fit.centroids, cluster_ids
    return (np.concatenate([fit.centroids, old_centroids[extra]]),
            np.concatenate([cluster_ids, old_ids[extra]]))


def apply_refit(store: Store, config: Config, plan: RefitPlan, report: RefitReport) -> None:
    """Swap the new clusters in and re-file images; fills `report`."""
    fit = plan.fit
    verdict = verdict_of(fit)
    report.n, report.fit_k, report.rule = plan.n, fit.k, verdict.rule
    report.scores, report.silhouette = fit.scores, fit.silhouette
    report.fit_seconds = fit.duration_s
    report.reason = plan.decision.reason
    action = plan.decision.action
    report.outcome = {Action.REPLACE: "replaced", Action.UPDATE: "updated",
                      Action.WAIT: "waiting"}[action]
    if action is Action.WAIT:
        return
    report.k = len(plan.cluster_ids)
    report.kept = int(np.count_nonzero(plan.cluster_ids >= 0))

    new_ids = plan.cluster_ids.copy()
    active = {c.id: c for c in store.clusters(active_only=True)}
    if report.dry_run:
        placeholders = iter(range(1, len(new_ids) + 1))
        names = {int(cid): c.folder for cid, c in active.items()}
        targets = {j: names.get(int(cid)) or f"(new cluster {next(placeholders)})"
                   for j, cid in enumerate(new_ids)}
        report.created = [targets[j] for j, cid in enumerate(new_ids) if cid < 0]
        pinned_in = _pinned_clusters(store)
        report.retired = [c.folder for cid, c in active.items() if cid not in new_ids
                          and not _stays(c, pinned_in)]
        _dry_refile(store, config, plan, targets, report)
        return
    # Follow what a user did in the library since segd last looked (folders renamed,
    # photos moved between folders or deleted): re-filing works from the stored paths
    # and must neither recreate an old folder name nor lose track of a moved photo.
    changes = reconcile(store, config)
    if changes:
        log.info("before re-filing: %s", changes)
    active = {c.id: c for c in store.clusters(active_only=True)}
    pinned_in = _pinned_clusters(store)
    taken = _taken_folder_names(store, config.library)
    with store.transaction():
        for j in range(len(new_ids)):
            if new_ids[j] >= 0 and int(new_ids[j]) in active:
                store.update_cluster(int(new_ids[j]), centroid=plan.centroids[j])
            else:
                folder = _next_folder_name(taken)
                taken.add(folder)
                new_ids[j] = store.add_cluster(folder, plan.centroids[j])
                report.created.append(folder)
        for cid, cluster in active.items():
            if cid not in new_ids and not _stays(cluster, pinned_in):
                store.update_cluster(cid, retired_at=time.time())
                report.retired.append(cluster.folder)
    report.moved, report.sorted_pending, report.pinned = _refile(store, config, plan, new_ids)
    store.recount_cluster_sizes()
    _remove_empty_retired_folders(store, config.library, report.retired)


def _stays(cluster: ClusterRow, pinned_in: set[int]) -> bool:
    """A live cluster no refit retires: the user made it, or pinned a photo in it."""
    return cluster.origin == "user" or cluster.id in pinned_in


def _pinned_clusters(store: Store) -> set[int]:
    return {int(image.cluster_id) for image in store.iter_images(state="sorted",
                                                                 embeddings=False)
            if image.pinned and image.cluster_id is not None}


def _targets(store: Store, plan: RefitPlan, image: ImageRow) -> tuple[int, float] | None:
    """(centroid index, distance) the plan gives this image (a row read without its
    embedding); None: it stays where it is.

    Photos the snapshot did not hold (filed meanwhile, or arrived) take the nearest
    centroid, their embedding read then; an update never moves a sorted photo, a pinned
    one never moves."""
    if image.pinned:
        return None
    if plan.decision.action is Action.UPDATE and image.state == "sorted":
        return None
    pos = int(np.searchsorted(plan.ids, image.id))
    if pos < len(plan.ids) and plan.ids[pos] == image.id:
        return int(plan.labels[pos]), float(plan.distances[pos])
    current = store.get_image(image.id)
    if current is None or current.embedding is None:
        return None
    label, dist = assign(current.embedding[None, :], plan.centroids)
    return int(label[0]), float(dist[0])


def _dry_refile(store: Store, config: Config, plan: RefitPlan, targets: dict[int, str | None],
                report: RefitReport) -> None:
    move_sorted = config.clustering.on_refit == "move"
    for image in store.iter_images(embeddings=False):
        if not image.has_embedding or image.state not in ("sorted", "pending"):
            continue
        report.pinned += image.pinned
        target = _targets(store, plan, image)
        if target is None:
            continue
        cid = int(plan.cluster_ids[target[0]])
        if image.state == "pending":
            report.sorted_pending += 1
            source = INBOX
        elif image.cluster_id == cid or not move_sorted or os.path.islink(image.path.parent):
            continue
        else:
            report.moved += 1
            source = image.path.parent.name
        report.planned.append(PlannedMove(str(image.path), source, str(targets[target[0]])))


def _refile(store: Store, config: Config, plan: RefitPlan,
            new_ids: np.ndarray) -> tuple[int, int, int]:
    """Move each image whose cluster changed (and every pending one) to its folder.
    Returns (moved, pending filed, pinned held)."""
    move_sorted = config.clustering.on_refit == "move"
    # Resolving creates each target folder and records its identity, so that a later
    # rename by the user is recognised (and followed) rather than the old name recreated.
    folders: dict[int, Path] = {}
    for cid in sorted({int(t) for t in new_ids}):
        try:
            folders[cid] = resolve_cluster_folder(store, config.library, cid)
        except SegdError as exc:  # e.g. replaced by a symlink: its files stay put
            log.warning("%s", exc)
    moved = pending_sorted = pinned = 0
    plans: list[MovePlan] = []
    # Plans are collected first (a few fields each; the embeddings are not read), so the
    # moves do not disturb the paged read.
    for image in store.iter_images(embeddings=False):
        if not image.has_embedding or image.state not in ("sorted", "pending"):
            continue
        pinned += image.pinned
        found = _targets(store, plan, image)
        if found is None:
            continue
        target, distance = int(new_ids[found[0]]), found[1]
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
        if target not in folders:
            continue
        plans.append(MovePlan(image.id, image.path, folders[target], image.original_name,
                              Filing.sorted_into(target, distance)))
    for move in plans:
        try:
            journaled_move(store, move)
        except FileNotFoundError:
            log.warning("%s vanished before it could be re-filed; forgetting it", move.src)
            store.delete_image(move.image_id)
        except OSError as exc:
            # The library is full or read-only: this file stays where it is (its row still
            # says so) and the rest of the refit goes on; the next refit tries it again.
            log.warning("%s could not be re-filed (%s); it stays where it is", move.src, exc)
    return moved, pending_sorted, pinned


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
