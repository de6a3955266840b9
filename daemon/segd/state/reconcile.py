"""Reconciliation: make the store agree with what the user did in the library.

The library folder is the interface and the file manager its UI; what a user does there is
ground truth. `reconcile` scans the library, asks `segd.core.corrections` what changed, and
records it: a renamed folder keeps its cluster; a photo moved into another cluster's
folder, or into a folder the user made, is pinned there (no refit moves it again); a
folder the user made becomes a cluster of that name; a folder emptied or deleted retires
its cluster, and no file is moved back; photos copied in from outside are embedded where
they lie. Only a file gone from the whole library is forgotten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from segd.config import Config
from segd.core.cluster import assign, normalize_rows
from segd.core.corrections import (
    Corrections,
    DiskFile,
    KnownCluster,
    KnownImage,
    LibraryScan,
    Placement,
    detect,
    needs_hash,
)
from segd.core.errors import ImageError, SegdError
from segd.core.filing import Filing
from segd.core.library import UNREADABLE_FOLDER, safe_folder
from segd.state import fsops
from segd.state.fsops import file_sha256
from segd.state.store import META_MODEL, ClusterRow, ImageRow, MoveRow, Store

log = logging.getLogger(__name__)

# (sha256, embedding) of each file, or the error that kept it from being embedded.
EmbedFiles = Callable[[list[Path]], list["tuple[str, np.ndarray] | Exception"]]


def _inode_key(cluster_id: int) -> str:
    return f"folder_inode:{cluster_id}"


def _identity(path: Path) -> str | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}" if stat.S_ISDIR(st.st_mode) else None


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
    fsops.make_dirs(folder)  # durable before any file is moved into it
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


# --------------------------------------------------------------------------- scanning


def _hidden(name: str) -> bool:
    # Dot files: the file manager's own (.DS_Store, .thumbnails) and segd's temporary copies.
    return name.startswith(".")


def scan_library(library: Path) -> LibraryScan:
    """Every top-level folder of the library and every regular file beneath it (symlinks
    are never followed; a top-level symlink or file is reported as blocked)."""
    folders: dict[str, str] = {}
    blocked: set[str] = set()
    files: list[DiskFile] = []
    try:
        entries = sorted(os.scandir(library), key=lambda e: e.name)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if _hidden(entry.name) or entry.name == UNREADABLE_FOLDER:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        path = Path(entry.path)
        if stat.S_ISREG(st.st_mode):
            files.append(DiskFile(path, f"{st.st_dev}:{st.st_ino}", st.st_size))
        elif stat.S_ISDIR(st.st_mode):
            folders[entry.name] = f"{st.st_dev}:{st.st_ino}"
            files.extend(_walk(path))
        else:
            blocked.add(entry.name)
    return LibraryScan(library, folders, tuple(files), frozenset(blocked))


def _walk(folder: Path) -> Iterable[DiskFile]:
    for top, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(names):
            if _hidden(name):
                continue
            path = Path(top) / name
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield DiskFile(path, f"{st.st_dev}:{st.st_ino}", st.st_size)




# --------------------------------------------------------------------------- embedding


def model_embedder(config: Config, store: Store) -> EmbedFiles:
    """Embed files with the configured model, loaded on first use (a start-up or a refit
    that finds no photo copied in from outside never pays for it). A model other than the
    one the store's embeddings came from embeds nothing: its vectors would not compare."""
    from segd.media.decode import DecodeOptions, decode_bytes, read_image_file
    from segd.media.embed import Embedder

    loaded: list[tuple[Embedder, DecodeOptions]] = []

    def embed(paths: list[Path]) -> list[tuple[str, np.ndarray] | Exception]:
        import hashlib

        if not loaded:
            embedder = Embedder.from_config(config.model, warmup=False)
            bound = store.get_meta(META_MODEL)
            if bound is not None and bound != embedder.identity:
                return [SegdError("the configured model is not the one the store's "
                                  "embeddings came from") for _ in paths]
            loaded.append((embedder, DecodeOptions(size=embedder.input_size,
                                                   resize=config.model.resize,
                                                   max_pixels=config.decode.max_pixels)))
        embedder, opts = loaded[0]
        out: list[tuple[str, np.ndarray] | Exception] = []
        for path in paths:
            try:
                data, _ = read_image_file(path, opts, follow_symlinks=False)
                pixels = decode_bytes(data, opts, name=str(path))
                out.append((hashlib.sha256(data).hexdigest(), embedder.embed(pixels[None])[0]))
            except (ImageError, OSError) as exc:
                out.append(exc)
        return out

    return embed


# --------------------------------------------------------------------------- applying


@dataclass
class Reconciled:
    """What one reconciliation recorded, for the log and `segd status`."""

    renamed: int = 0
    pinned: int = 0  # files the user moved into another cluster's (or a new) folder
    followed: int = 0  # files found at another path, their cluster unchanged
    new_clusters: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    embedded: int = 0  # photos copied in from outside, embedded where they lie
    unreadable: int = 0  # files in a folder that are not photos segd can read
    waiting: int = 0  # photos copied in from outside, not embedded (no model at hand)
    forgotten: int = 0

    def summary(self) -> str:
        parts = []
        if self.renamed:
            parts.append(f"{self.renamed} renamed folder(s) followed")
        if self.pinned:
            parts.append(f"{self.pinned} file(s) placed by you pinned to their folder")
        if self.followed:
            parts.append(f"{self.followed} file(s) found at a new path followed")
        if self.new_clusters:
            parts.append(f"your folder(s) {', '.join(self.new_clusters)} became clusters")
        if self.retired:
            parts.append(f"cluster(s) {', '.join(self.retired)} retired")
        if self.embedded:
            parts.append(f"{self.embedded} photo(s) you added embedded where they lie")
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable file(s) in folders left alone")
        if self.waiting:
            parts.append(f"{self.waiting} photo(s) you added wait to be embedded")
        if self.forgotten:
            parts.append(f"{self.forgotten} file(s) gone from the library forgotten")
        return "; ".join(parts)


def reconcile(store: Store, config: Config, embed: EmbedFiles | None = None) -> str:
    """Follow what the user did in the library since segd last looked; a summary or ''.

    ``embed`` embeds photos copied into the library from outside (default: the configured
    model, loaded only if there are any)."""
    done = reconcile_library(store, config,
                             embed if embed is not None else model_embedder(config, store))
    summary = done.summary()
    if summary:
        store.set_meta(META_LAST, f"{time.time():.3f} {summary}")
    return summary


META_LAST = "corrections:last"  # when the last reconciliation changed something, and what


def reconcile_library(store: Store, config: Config, embed: EmbedFiles | None) -> Reconciled:
    """`reconcile`'s work, returning the counts; ``embed=None`` leaves new photos waiting."""
    library = config.library
    scan = scan_library(library)
    clusters = known_clusters(store)
    # Rows without their embeddings: a library's worth of vectors would not fit in memory;
    # the few a correction needs are read one at a time.
    rows = {img.id: img for img in store.iter_images(embeddings=False)}
    on_disk = {f.path for f in scan.files}
    images = [KnownImage(r.id, r.path, r.sha256, r.state, r.cluster_id, r.pinned, r.file_id,
                         r.file_size,
                         present=r.path in on_disk or os.path.lexists(r.path))
              for r in rows.values()]
    wanted = needs_hash(scan, clusters, images)
    hashes = {p: h for p in sorted(wanted) if (h := file_sha256(p)) is not None}
    found = detect(scan, clusters, images, hashes)
    done = Reconciled()
    if not found.empty:
        _apply(store, config, scan, found, rows, hashes, embed, done)
        # Inside a refit's undo point (reconciling before it re-files): what the user did
        # is not the refit's to take back.
        store.retake_refit_snapshot()
    store.record_file_ids(list(found.seen))
    record_identities(store, library)
    return done


def known_clusters(store: Store) -> list[KnownCluster]:
    """Every cluster, active or not, with the folder identity segd last recorded."""
    return [KnownCluster(c.id, c.folder, store.get_meta(_inode_key(c.id)) or None, c.active)
            for c in store.clusters(active_only=False)]


def _apply(store: Store, config: Config, scan: LibraryScan, found: Corrections,
           rows: dict[int, ImageRow], hashes: dict[Path, str], embed: EmbedFiles | None,
           done: Reconciled) -> None:
    library = config.library
    by_id = {c.id: c for c in store.clusters(active_only=False)}
    for cid, name in found.renamed.items():
        count = store.rename_cluster_folder(cid, library / by_id[cid].folder, library / name)
        log.info("cluster folder %s was renamed to %s; following it (%d images)",
                 by_id[cid].folder, name, count)
        done.renamed += 1
    by_id = {c.id: c for c in store.clusters(active_only=False)}  # with the new names

    # Photos copied in from outside: embedded before anything is written, so a new folder's
    # centroid can include them. A copy of a photo segd knows reuses its embedding.
    embedded: dict[Path, tuple[str, np.ndarray]] = {}
    arrivals = [p for paths in found.arrivals.values() for p in paths]
    if arrivals:
        embedded, done.unreadable, done.waiting = _embed_arrivals(store, arrivals, hashes,
                                                                  embed)
    disk = {f.path: f for f in scan.files}
    now = time.time()
    with store.transaction():
        folder_cluster = _user_clusters(store, found, embedded, done)
        centroids = {c.id: c.centroid for c in store.clusters(active_only=True)}
        for p in found.placements:
            _place(store, p, rows[p.image_id], folder_cluster, centroids, by_id, done)
        for folder, paths in found.arrivals.items():
            cid = folder_cluster.get(folder) or _cluster_of_folder(store, folder)
            for path in paths:
                if path not in embedded or cid is None:
                    continue
                sha, emb = embedded[path]
                dist = _distance(emb, centroids[cid])
                iid = store.add_image(sha, path.name, path, "sorted", embedding=emb,
                                      cluster_id=cid, distance=dist, pinned=True)
                f = disk.get(path)
                if f is not None:
                    store.record_file_ids([(iid, f.file_id, f.size)])
                store.record_correction(iid, "added", cid, f"put in {folder} by you")
                done.embedded += 1
        for r in found.retired:
            cluster = by_id[r.cluster_id]
            store.update_cluster(r.cluster_id, retired_at=now)
            why = {"merged": f"merged into {r.into} by you", "emptied": "emptied by you",
                   "deleted": "its folder was deleted by you"}[r.how]
            store.record_correction(None, r.how, r.cluster_id, f"{cluster.folder}: {why}")
            log.info("cluster %s (%d) retired: %s; no file moved", cluster.folder,
                     r.cluster_id, why)
            done.retired.append(cluster.folder)
        for image_id in found.forgotten:
            log.info("%s is gone from the library; forgotten", rows[image_id].path)
            store.delete_image(image_id)
            done.forgotten += 1
        _refresh_user_centroids(store)
        store.recount_cluster_sizes()
    for r in found.retired:
        if r.how != "deleted":
            with contextlib.suppress(OSError, SegdError):
                safe_folder(library, by_id[r.cluster_id].folder).rmdir()  # only when empty


def _embed_arrivals(store: Store, paths: list[Path], hashes: dict[Path, str],
                    embed: EmbedFiles | None,
                    ) -> tuple[dict[Path, tuple[str, np.ndarray]], int, int]:
    """(embedded files, unreadable count, waiting count)."""
    out: dict[Path, tuple[str, np.ndarray]] = {}
    rest = []
    for path in paths:
        sha = hashes.get(path) or file_sha256(path)
        twin = next((r.embedding for r in store.find_by_sha256(sha)
                     if r.embedding is not None), None) if sha is not None else None
        if sha is not None and twin is not None:
            out[path] = (sha, twin)
        else:
            rest.append(path)
    if not rest:
        return out, 0, 0
    if embed is None:
        log.info("%d photo(s) put in the library from outside wait to be embedded (the "
                 "daemon embeds them where they lie when it next starts)", len(rest))
        return out, 0, len(rest)
    unreadable = 0
    for path, result in zip(rest, embed(rest), strict=True):
        if isinstance(result, Exception):
            log.info("%s: not a photo segd can read (%s); left where it is", path, result)
            unreadable += 1
        else:
            out[path] = result
    return out, unreadable, 0


def _user_clusters(store: Store, found: Corrections,
                   embedded: dict[Path, tuple[str, np.ndarray]],
                   done: Reconciled) -> dict[str, int]:
    """Create (or revive) a cluster for each folder the user made; folder -> cluster id."""
    out: dict[str, int] = {}
    retired_by_folder = {c.folder: c for c in store.clusters(active_only=False)
                         if not c.active}
    for folder, members in found.new_folders.items():
        vectors = [e for i in members if (e := _embedding(store, i)) is not None]
        vectors += [embedded[p][1] for p in found.arrivals.get(folder, ()) if p in embedded]
        if not vectors:
            continue  # nothing in it segd can read yet
        centroid = normalize_rows(np.mean(np.stack(vectors), axis=0, keepdims=True))[0]
        old = retired_by_folder.get(folder)
        if old is not None:
            store.update_cluster(old.id, retired_at=None, centroid=centroid, origin="user")
            out[folder] = old.id
        else:
            out[folder] = store.add_cluster(folder, centroid, origin="user")
        store.record_correction(None, "folder", out[folder], f"{folder}: made by you")
        log.info("your folder %s became cluster %d (%d photo(s))", folder, out[folder],
                 len(vectors))
        done.new_clusters.append(folder)
    return out


def _cluster_of_folder(store: Store, folder: str) -> int | None:
    for c in store.clusters(active_only=True):
        if c.folder == folder:
            return c.id
    return None


def _place(store: Store, p: Placement, row: ImageRow, folder_cluster: dict[str, int],
           centroids: dict[int, np.ndarray], by_id: dict[int, ClusterRow],
           done: Reconciled) -> None:
    cid = p.cluster_id if p.folder is None else folder_cluster.get(p.folder)
    if p.folder is not None and cid is None:
        log.warning("%s: its folder %s could not become a cluster; not followed", p.path,
                    p.folder)
        return
    emb = _embedding(store, row.id) if p.pin else None
    if p.pin and cid is not None and emb is not None and cid in centroids:
        filing = Filing.pinned_to(cid, _distance(emb, centroids[cid]))
    elif row.state == "pending" and cid is None:
        filing = row.filing
    else:
        filing = replace(row.filing, cluster_id=cid if row.state == "sorted" else None)
    try:
        store.file_image(row.id, p.path, filing)
    except SegdError as exc:
        log.warning("%s: could not be followed: %s", p.path, exc)
        return
    if filing.pinned and not (row.pinned and row.cluster_id == cid):
        came = _folder_name(by_id, p.from_cluster) if p.from_cluster is not None else "inbox"
        to = _folder_name(by_id, cid)
        store.record_correction(row.id, "moved", cid, f"moved by you from {came} to {to}")
        log.info("%s: moved by you from %s to %s; pinned there", p.path.name, came, to)
        done.pinned += 1
    else:
        done.followed += 1


def _embedding(store: Store, image_id: int) -> np.ndarray | None:
    row = store.get_image(image_id)
    return None if row is None else row.embedding


def _folder_name(by_id: dict[int, ClusterRow], cid: int | None) -> str:
    cluster = by_id.get(cid) if cid is not None else None
    return cluster.folder if cluster is not None else f"cluster {cid}"


def _distance(embedding: np.ndarray, centroid: np.ndarray) -> float:
    _, dist = assign(embedding[None, :].astype(np.float32), centroid[None, :])
    return float(dist[0])


def _refresh_user_centroids(store: Store) -> None:
    """A user's cluster is what the user put in it: its centroid is its members' mean."""
    members: dict[int, list[np.ndarray]] = {}
    user = {c.id for c in store.clusters(active_only=True) if c.origin == "user"}
    if not user:
        return
    for img in store.iter_images("sorted"):
        if img.cluster_id in user and img.embedding is not None:
            members.setdefault(img.cluster_id, []).append(img.embedding)
    for cid, vectors in members.items():
        centroid = normalize_rows(np.mean(np.stack(vectors), axis=0, keepdims=True))[0]
        store.update_cluster(cid, centroid=centroid)


def record_identities(store: Store, library: Path) -> None:
    """Remember each active cluster folder's identity, so a later rename is recognised."""
    for c in store.clusters(active_only=True):
        try:
            identity = _identity(safe_folder(library, c.folder))
        except SegdError:
            continue
        if identity and store.get_meta(_inode_key(c.id)) != identity:
            store.set_meta(_inode_key(c.id), identity)

