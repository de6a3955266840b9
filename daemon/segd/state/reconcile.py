"""Start-up reconciliation: make the store agree with what is on disk.

Users work in the library between runs: they rename cluster folders, move photos from one
folder to another, delete photos. segd follows them rather than fighting them: a renamed
folder is recognised by its inode and keeps its cluster; a photo moved into another
cluster's folder now belongs to that cluster; a deleted photo is forgotten.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from segd.config import Config
from segd.core.errors import SegdError
from segd.core.filing import Filing
from segd.core.library import safe_folder
from segd.state.store import ImageRow, MoveRow, Store

log = logging.getLogger(__name__)


def _inode_key(cluster_id: int) -> str:
    return f"folder_inode:{cluster_id}"


def _identity(path: Path) -> str | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}" if os.path.isdir(path) else None


def resolve_cluster_folder(store: Store, library: Path, cluster_id: int) -> Path:
    """The folder a cluster's files go to, following a rename by the user if there was one."""
    cluster = store.get_cluster(cluster_id)
    if cluster is None:
        raise KeyError(f"no cluster {cluster_id}")
    folder = safe_folder(library, cluster.folder)
    known = store.get_meta(_inode_key(cluster_id))
    if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        # A symlink (or a file) where the cluster's folder should be: filing "into" it would
        # put photos wherever the link points, outside the library. Never follow it; follow
        # a rename of the real folder inside the library if there was one, else the
        # cluster's files wait in the inbox until a person puts a real folder back.
        renamed = _find_dir_with_identity(library, known) if known else None
        if renamed is not None:
            count = store.rename_cluster_folder(cluster_id, folder, renamed)
            log.info("cluster folder %s was renamed to %s; following it (%d images)",
                     cluster.folder, renamed.name, count)
            return renamed
        raise SegdError(f"cluster folder {folder} is a symbolic link or not a folder; "
                        "segd does not file through it (files for this cluster wait in "
                        "the inbox)")
    if os.path.isdir(folder):
        if known is None:
            store.set_meta(_inode_key(cluster_id), _identity(folder) or "")
        return folder
    if known:
        renamed = _find_dir_with_identity(library, known)
        if renamed is not None:
            count = store.rename_cluster_folder(cluster_id, folder, renamed)
            log.info("cluster folder %s was renamed to %s; following it (%d images)",
                     cluster.folder, renamed.name, count)
            return renamed
    folder.mkdir(parents=True, exist_ok=True)
    store.set_meta(_inode_key(cluster_id), _identity(folder) or "")
    return folder


def _find_dir_with_identity(library: Path, identity: str) -> Path | None:
    try:
        entries = list(os.scandir(library))
    except OSError:
        return None
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            if f"{st.st_dev}:{st.st_ino}" == identity:
                return Path(entry.path)
    return None


def filing_after_move(store: Store, config: Config, move: MoveRow, image: ImageRow) -> Filing:
    """The filing a completed journaled move implies, from where its dst lies; what dst
    does not tell (the distance, a reason) stays as the image had it."""
    parent = move.dst.parent
    if parent == config.quarantine:
        return replace(image.filing, state="quarantined", pinned=False)
    if parent.parent == config.library:
        for cluster in store.clusters(active_only=False):
            if cluster.folder == parent.name:
                return replace(image.filing, state="sorted", cluster_id=cluster.id)
    return image.filing


def reconcile(store: Store, config: Config) -> str:
    """Follow folder renames and file moves made while segd was stopped; a summary or ''."""
    clusters = store.clusters(active_only=True)
    for cluster in clusters:
        try:
            resolve_cluster_folder(store, config.library, cluster.id)
        except SegdError as exc:  # one bad folder must not keep the daemon from starting
            log.warning("%s", exc)
    folder_of = {c.id: c.folder for c in store.clusters(active_only=True)}
    by_folder = {name: cid for cid, name in folder_of.items()}

    moved = forgotten = 0
    changes: list[tuple[int, tuple[Path, Filing] | None]] = []
    for image in store.iter_images():
        if os.path.lexists(image.path):
            continue
        found = None
        if image.state == "sorted":
            for name, cid in by_folder.items():
                candidate = config.library / name / image.path.name
                if os.path.lexists(candidate) and store.find_by_path(candidate) is None:
                    found = (candidate, replace(image.filing, cluster_id=cid))
                    break
        changes.append((image.id, found))
    for image_id, found in changes:
        if found is None:
            store.delete_image(image_id)
            forgotten += 1
        else:
            store.file_image(image_id, *found)
            moved += 1
    if moved or forgotten:
        store.recount_cluster_sizes()
    parts = []
    if moved:
        parts.append(f"{moved} file(s) moved between clusters by a user followed")
    if forgotten:
        parts.append(f"{forgotten} file(s) no longer on disk forgotten")
    return "; ".join(parts)
