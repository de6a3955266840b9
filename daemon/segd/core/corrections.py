"""What the user did in the library, from a scan of it and the store's view of it (pure).

The library folder is the interface: a photo moved from one cluster folder into another is
the user saying where it belongs; a folder the user made and filled is a new cluster;
emptying or deleting a folder ends its cluster. This module reads those intentions off two
pictures of the same library, what is on disk and what the store last recorded, and says
what changed. It decides only; `segd.state.reconcile` scans, hashes and writes.

A file is followed by its identity first (st_dev:st_ino as the last scan saw it, which a
move inside one filesystem keeps), then by its bytes (size, then sha256): a photo the user
moved is never mistaken for one that was deleted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

RETIRE_HOW: Final = ("deleted", "emptied", "merged")


@dataclass(frozen=True, slots=True)
class DiskFile:
    """A regular file found under the library."""

    path: Path
    file_id: str  # "st_dev:st_ino"
    size: int


@dataclass(frozen=True, slots=True)
class LibraryScan:
    """The library as it is: its top-level folders and every file beneath them."""

    root: Path
    folders: Mapping[str, str]  # top-level folder name -> its identity
    files: tuple[DiskFile, ...]
    # Top-level names that are not real folders (a symlink, a file): never read through.
    blocked: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class KnownCluster:
    id: int
    folder: str
    folder_id: str | None  # the folder's identity when segd last resolved it
    active: bool = True


@dataclass(frozen=True, slots=True)
class KnownImage:
    id: int
    path: Path
    sha256: str
    state: str
    cluster_id: int | None
    pinned: bool = False
    file_id: str | None = None
    file_size: int | None = None
    # Its stored path still names something (the caller's lstat); covers files the scan
    # does not list, such as the inbox, the quarantine or a folder behind a symlink.
    present: bool = False


@dataclass(frozen=True, slots=True)
class Placement:
    """A known image whose place or cluster changes."""

    image_id: int
    path: Path  # where its file is now
    cluster_id: int | None  # the cluster whose folder holds it (None: see folder)
    folder: str | None  # a new, user-made folder holding it, when cluster_id is None
    pin: bool  # put there by the user: it stays whatever a refit finds
    from_cluster: int | None  # its cluster before
    moved: bool  # its path changed


@dataclass(frozen=True, slots=True)
class Retirement:
    cluster_id: int
    how: str  # one of RETIRE_HOW
    into: str | None = None  # merged: the one folder all its files went to


@dataclass(frozen=True, slots=True)
class Corrections:
    renamed: dict[int, str] = field(default_factory=dict)  # cluster id -> new folder name
    placements: tuple[Placement, ...] = ()
    # Folders the user made: name -> ids of known images now in it (maybe none yet).
    new_folders: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Files unknown to the store, by the folder they lie in (a cluster's or a new one).
    arrivals: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    retired: tuple[Retirement, ...] = ()
    forgotten: tuple[int, ...] = ()  # images whose file is gone from everywhere
    # (image id, file id, size) seen at their place, where the store's record differs.
    seen: tuple[tuple[int, str, int], ...] = ()
    ignored: tuple[Path, ...] = ()  # unknown files outside any folder: left alone

    @property
    def empty(self) -> bool:
        return not (self.renamed or self.placements or self.new_folders or self.arrivals
                    or self.retired or self.forgotten)


def needs_hash(scan: LibraryScan, clusters: Iterable[KnownCluster],
               images: Iterable[KnownImage]) -> frozenset[Path]:
    """The unknown files whose sha256 can tell whether they are a missing image: those not
    matched by identity whose size a still-missing image has (or might have)."""
    view = _View(scan, list(clusters), list(images))
    missing = [img for img in view.missing if img.id not in view.by_identity]
    strays = [f for f in view.strays if f.path not in view.by_identity.values()]
    if not missing:
        return frozenset()
    sizes = {img.file_size for img in missing}
    if None in sizes:
        return frozenset(f.path for f in strays)
    return frozenset(f.path for f in strays if f.size in sizes)


def detect(scan: LibraryScan, clusters: Iterable[KnownCluster], images: Iterable[KnownImage],
           hashes: Mapping[Path, str] | None = None) -> Corrections:
    """What changed in the library since the store last looked; ``hashes`` holds the sha256
    of (at least) the files `needs_hash` named."""
    view = _View(scan, list(clusters), list(images))
    found: dict[int, Path] = dict(view.by_identity)
    claimed = set(found.values())
    by_sha: dict[str, list[DiskFile]] = defaultdict(list)
    for f in view.strays:
        sha = (hashes or {}).get(f.path)
        if sha is not None and f.path not in claimed:
            by_sha[sha].append(f)
    for img in view.missing:
        if img.id in found:
            continue
        candidates = [f for f in by_sha.get(img.sha256, ()) if f.path not in claimed]
        if candidates:
            # Several copies of the same bytes: prefer the one that kept the file's name.
            same_name = [f for f in candidates if f.path.name == img.path.name]
            chosen = (same_name or candidates)[0]
            found[img.id] = chosen.path
            claimed.add(chosen.path)

    placements: list[Placement] = []
    members_after: dict[int, int] = defaultdict(int)
    new_folders: dict[str, list[int]] = {}
    went_to: dict[int, set[str]] = defaultdict(set)  # cluster id -> folders its files went to
    forgotten: list[int] = []
    seen: list[tuple[int, str, int]] = []
    for img in view.images:
        here = view.current_path(img)
        if img.id in found:
            now: Path | None = found[img.id]
        elif view.at_place(img):
            now = here
        else:
            now = None
        if now is None:
            forgotten.append(img.id)
            continue
        disk = view.on_disk.get(now)
        if disk is not None and (disk.file_id, disk.size) != (img.file_id, img.file_size):
            seen.append((img.id, disk.file_id, disk.size))
        moved = now != here
        folder = view.folder_of(now)
        if img.state == "sorted" and img.cluster_id is not None and folder is not None:
            went_to[img.cluster_id].add(folder)
        # A renamed folder's files are not moves: the rename rewrites their paths.
        placement = _place(view, img, now, folder, moved=moved)
        target = img.cluster_id if placement is None else placement.cluster_id
        if img.state == "sorted" and target is not None:
            members_after[target] += 1
        if placement is None:
            continue
        if placement.folder is not None:
            new_folders.setdefault(placement.folder, []).append(img.id)
        placements.append(placement)

    arrivals: dict[str, list[Path]] = defaultdict(list)
    ignored: list[Path] = []
    for f in view.strays:
        if f.path in claimed:
            continue
        folder = view.folder_of(f.path)
        if folder is None:
            ignored.append(f.path)
            continue
        arrivals[folder].append(f.path)
        if folder in view.cluster_by_folder:
            members_after[view.cluster_by_folder[folder]] += 1
        else:
            new_folders.setdefault(folder, [])

    retired = []
    for cid, name in view.folder_of_cluster.items():
        if name in scan.blocked:
            continue  # not a real folder now: leave the cluster as it is
        gone = name not in scan.folders
        if not gone and (members_after[cid] or not view.members_before[cid]):
            continue
        dests = went_to[cid] - {name}
        if len(dests) == 1 and members_after[cid] == 0:
            retired.append(Retirement(cid, "merged", next(iter(dests))))
        else:
            retired.append(Retirement(cid, "deleted" if gone else "emptied"))
    return Corrections(
        renamed=view.renamed,
        placements=tuple(placements),
        new_folders={k: tuple(v) for k, v in sorted(new_folders.items())},
        arrivals={k: tuple(sorted(v)) for k, v in sorted(arrivals.items())},
        retired=tuple(retired),
        forgotten=tuple(forgotten),
        seen=tuple(seen),
        ignored=tuple(sorted(ignored)),
    )


def _place(view: _View, img: KnownImage, now: Path, folder: str | None, *,
           moved: bool) -> Placement | None:
    """The placement an image's current location implies, or None when nothing changes."""
    if img.state not in ("sorted", "pending") or folder is None:
        # Quarantined files are not filed by folder; a file at the library's top level or
        # outside it is followed, its filing unchanged.
        if not moved:
            return None
        return Placement(img.id, now, img.cluster_id, None, img.pinned, img.cluster_id, True)
    target = view.cluster_by_folder.get(folder)
    if target is None:
        # A folder the user made (or one whose cluster had retired): it becomes a cluster
        # with the user's name, and what is in it stays there.
        return Placement(img.id, now, None, folder, True, img.cluster_id, moved)
    if img.state == "sorted" and img.cluster_id == target:
        if not moved:
            return None
        return Placement(img.id, now, target, None, img.pinned, img.cluster_id, True)
    if not moved:
        return None
    return Placement(img.id, now, target, None, True, img.cluster_id, True)


class _View:
    """The two pictures side by side: indexes both detect() and needs_hash() use."""

    def __init__(self, scan: LibraryScan, clusters: list[KnownCluster],
                 images: list[KnownImage]) -> None:
        self.scan = scan
        self.images = images
        active = [c for c in clusters if c.active]
        taken = {c.folder for c in clusters}
        by_identity = {fid: name for name, fid in scan.folders.items()}
        self.renamed: dict[int, str] = {}
        for c in active:
            if c.folder in scan.folders or c.folder in scan.blocked or not c.folder_id:
                continue
            name = by_identity.get(c.folder_id)
            if name is not None and name not in taken:
                self.renamed[c.id] = name
                taken.add(name)
        self._old_names = {c.id: c.folder for c in active}
        self.folder_of_cluster = {c.id: self.renamed.get(c.id, c.folder) for c in active}
        self.cluster_by_folder = {name: cid for cid, name in self.folder_of_cluster.items()
                                  if name in scan.folders}
        self._prefix = {scan.root / old: scan.root / self.renamed[cid]
                        for cid, old in self._old_names.items() if cid in self.renamed}
        self.on_disk = {f.path: f for f in scan.files}
        self.members_before: dict[int, int] = defaultdict(int)
        for img in images:
            if img.state == "sorted" and img.cluster_id is not None:
                self.members_before[img.cluster_id] += 1
        known = {self.current_path(img) for img in images}
        self.strays = [f for f in scan.files if f.path not in known]
        self.missing = [img for img in images if not self.at_place(img)]
        stray_by_id = {f.file_id: f for f in self.strays}
        self.by_identity: dict[int, Path] = {}
        for img in self.missing:
            f = stray_by_id.get(img.file_id) if img.file_id else None
            if f is not None and (img.file_size is None or img.file_size == f.size):
                self.by_identity[img.id] = f.path
                del stray_by_id[f.file_id]

    def current_path(self, img: KnownImage) -> Path:
        """The stored path, with a renamed cluster folder's new name."""
        parent = img.path.parent
        for old, new in self._prefix.items():
            if parent == old or parent.is_relative_to(old):
                return new / img.path.relative_to(old)
        return img.path

    def at_place(self, img: KnownImage) -> bool:
        here = self.current_path(img)
        if here in self.on_disk:
            return True
        if here != img.path or self._scanned(here):
            # Where the scan looked it is the truth: not listed means not there.
            return False
        return img.present

    def folder_of(self, path: Path) -> str | None:
        """The top-level library folder (a real one) a path lies in; None at the library's
        top level, in a blocked entry or outside the library."""
        parts = self._parts(path)
        if len(parts) < 2 or parts[0] not in self.scan.folders:
            return None
        return parts[0]

    def _scanned(self, path: Path) -> bool:
        parts = self._parts(path)
        return len(parts) == 1 or (len(parts) >= 2 and parts[0] in self.scan.folders)

    def _parts(self, path: Path) -> tuple[str, ...]:
        try:
            return path.relative_to(self.scan.root).parts
        except ValueError:
            return ()
