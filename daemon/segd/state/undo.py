"""Undo the last refit: its moves reversed exactly, its clusters put back as they were.

A refit records an undo point as it applies (`undo_point`): the clusters just before it
changed anything, then every file it moved with the image's filing before the move. `segd
undo` checks that nothing has changed since (the moved files' bytes and places, new
arrivals in the folders it touched, the user's own moves), then moves each file back
through the same journaled, no-clobber moves as any other, and restores the clusters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from segd.config import Config
from segd.core.corrections import KnownImage, detect
from segd.core.errors import SegdError
from segd.core.library import safe_folder
from segd.state.fsops import file_sha256
from segd.state.journal import RefitMove, RefitPoint
from segd.state.mover import MovePlan, journaled_moves
from segd.state.reconcile import known_clusters, record_identities, scan_library
from segd.state.store import Store

log = logging.getLogger(__name__)


class UndoRefused(SegdError):
    """The last refit cannot be undone now; the message says why."""


def snapshot_clusters(store: Store) -> int:
    """Record an undo point before a refit applies anything: the clusters as they are now.
    Every move the store journals from now until ``store.close_refit(id)`` belongs to it.
    Returns the refit's id. Prefer `undo_point`, which closes it too."""
    return store.open_refit()


@contextlib.contextmanager
def undo_point(store: Store) -> Iterator[int]:
    """Around a refit's apply step (the swap and the re-filing)::

        with undo_point(store) as refit_id:
            ...swap clusters, journaled moves...
    """
    refit_id = snapshot_clusters(store)
    try:
        yield refit_id
    finally:
        store.close_refit(refit_id)


@dataclass
class UndoReport:
    refit_id: int
    moved_back: int = 0
    restored: list[str] = field(default_factory=list)  # clusters active again
    retired: list[str] = field(default_factory=list)  # clusters the refit had created

    def summary(self) -> str:
        parts = [f"undid refit {self.refit_id}: {self.moved_back} file(s) moved back"]
        if self.restored:
            parts.append(f"cluster(s) {', '.join(self.restored)} restored")
        if self.retired:
            parts.append(f"cluster(s) {', '.join(self.retired)} the refit made retired")
        return "; ".join(parts)


def undoable(store: Store) -> tuple[RefitPoint, list[RefitMove]]:
    """The last refit and its moves, or UndoRefused saying why it cannot be undone."""
    point = store.last_refit()
    if point is None:
        raise UndoRefused("no refit to undo")
    if point.undone_at is not None:
        raise UndoRefused(f"the last refit ({point.id}) has already been undone")
    if point.finished_at is None:
        raise UndoRefused(f"the last refit ({point.id}) did not finish; nothing to undo "
                          "safely")
    before = store.clusters_before(point.id)
    if not any(c.retired_at is None for c in before):
        raise UndoRefused("the last refit was the first fit: there were no clusters to go "
                          "back to")
    return point, store.refit_moves(point.id)


def check_unchanged(store: Store, config: Config, point: RefitPoint,
                    moves: list[RefitMove]) -> list[str]:
    """Why undoing now would not restore exactly what was there (empty: it would)."""
    problems: list[str] = []
    finished = point.finished_at or point.started_at
    moved_ids = {m.image_id for m in moves if m.image_id is not None}
    for m in moves:
        image = store.get_image(m.image_id) if m.image_id is not None else None
        if image is None:
            problems.append(f"{m.dst.name}: no longer known to segd")
            continue
        if image.path != m.dst:
            problems.append(f"{m.dst.name}: moved since the refit (now {image.path})")
            continue
        if not os.path.lexists(m.dst):
            problems.append(f"{m.dst}: gone since the refit")
        elif file_sha256(m.dst) != image.sha256:
            problems.append(f"{m.dst}: its bytes changed since the refit")
        if image.updated_at > finished:
            problems.append(f"{m.dst.name}: re-filed since the refit")
        if os.path.lexists(m.src) or store.find_by_path(m.src) is not None:
            problems.append(f"{m.src}: its old place is taken")
    # The clusters the refit touched: those it moved files out of or into, and new ones.
    before_ids = {c.cluster_id for c in store.clusters_before(point.id)}
    affected = {c.id for c in store.clusters(active_only=False) if c.id not in before_ids}
    for m in moves:
        image = store.get_image(m.image_id) if m.image_id is not None else None
        affected |= {c for c in (m.before.cluster_id, image and image.cluster_id)
                     if c is not None}
    for img in store.iter_images(embeddings=False):
        if img.id in moved_ids or img.cluster_id not in affected:
            continue
        if img.added_at > finished:
            problems.append(f"{img.path.name}: arrived in {img.path.parent.name} since the "
                            "refit")
        elif img.updated_at > finished:
            problems.append(f"{img.path.name}: placed in {img.path.parent.name} since the "
                            "refit")
    if store.pending_moves():
        problems.append("moves are in progress")
    problems += _library_changes(store, config)
    return problems


def _library_changes(store: Store, config: Config) -> list[str]:
    """What the user did in the library that the store has not recorded yet."""
    scan = scan_library(config.library)
    on_disk = {f.path for f in scan.files}
    images = [KnownImage(r.id, r.path, r.sha256, r.state, r.cluster_id, r.pinned, r.file_id,
                         r.file_size, present=r.path in on_disk or os.path.lexists(r.path))
              for r in store.iter_images(embeddings=False)]
    found = detect(scan, known_clusters(store), images)
    out = []
    if found.renamed:
        out.append(f"{len(found.renamed)} folder(s) renamed since the refit")
    if found.placements:
        out.append(f"{len(found.placements)} file(s) moved by you since the refit")
    if found.arrivals:
        count = sum(len(v) for v in found.arrivals.values())
        out.append(f"{count} file(s) added to the library since the refit")
    if found.retired:
        out.append(f"{len(found.retired)} folder(s) emptied or deleted since the refit")
    if found.forgotten:
        out.append(f"{len(found.forgotten)} file(s) deleted since the refit")
    return out


def undo_last_refit(store: Store, config: Config) -> UndoReport:
    """Reverse the last refit, or UndoRefused (nothing touched) saying why not."""
    point, moves = undoable(store)
    problems = check_unchanged(store, config, point, moves)
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UndoRefused(f"files changed since the last refit, so undoing it would not "
                          f"restore what was there: {shown}{more}")
    report = UndoReport(point.id)
    before = {c.cluster_id: c for c in store.clusters_before(point.id)}
    now_active = {c.id: c for c in store.clusters(active_only=True)}
    plans = []
    for m in reversed(moves):  # last moved, first back
        if m.image_id is None:
            continue
        plans.append(MovePlan(m.image_id, m.dst, m.src.parent, m.src.name, m.before,
                              expected=os.lstat(m.dst)))
    outcomes = journaled_moves(store, plans)
    failed = [(p, o) for p, o in zip(plans, outcomes, strict=True) if not isinstance(o, Path)]
    misplaced = [(p, o) for p, o in zip(plans, outcomes, strict=True)
                 if isinstance(o, Path) and o != p.folder / p.name]
    report.moved_back = len(plans) - len(failed)
    if failed or misplaced:
        # Nothing is lost (every file is where its row says), but the clusters stay as the
        # refit left them: the user is told, and `segd undo` can be run again.
        what = [f"{p.src}: {o}" for p, o in failed] + [f"{p.src} -> {o}" for p, o in misplaced]
        raise UndoRefused(f"undo stopped: {len(failed)} file(s) could not be moved back and "
                          f"{len(misplaced)} went to another name: {'; '.join(what[:5])}")
    store.restore_clusters(point.id, retire_at=time.time())
    store.recount_cluster_sizes()
    report.restored = [c.folder for cid, c in before.items()
                       if c.retired_at is None and cid not in now_active]
    report.retired = [c.folder for cid, c in now_active.items() if cid not in before]
    for cid, c in now_active.items():
        if cid not in before or before[cid].retired_at is not None:
            with contextlib.suppress(OSError, SegdError):
                safe_folder(config.library, c.folder).rmdir()  # only when empty
    record_identities(store, config.library)
    log.info("%s", report.summary())
    return report
