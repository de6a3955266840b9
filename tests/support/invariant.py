"""The one invariant of segd's daemon, checked from the disk and the store alone.

Every file ever dropped into the inbox exists exactly once, byte for byte, in
``library/<cluster>/``, in ``quarantine/``, or (still pending) in the inbox; no temporary
file is left anywhere; and the store agrees with the disk: each image row names an existing
file with the row's sha256, each file in the library and the quarantine has exactly one row,
each row's state (and cluster) matches the folder it lies in, and no journaled move is left
open after a clean stop. And nothing outside segd's folders was created, changed or deleted:
``Sentinel.take(folder)`` snapshots a folder beside them (or any folder segd must never
touch, such as the target of a symlink dropped into the inbox) and ``check_invariant(...,
outside=[sentinel])`` compares it again.

What "exists exactly once" means for things that are not regular files: a symlink dropped
into the inbox is quarantined as the link itself (its target is never read, moved or
followed), so it is recorded with ``DropLedger.record_symlink`` and matched by its link
text, not by the bytes of whatever it points to. FIFOs, sockets, device nodes and
directories are not files segd takes: they stay in the inbox untouched and are not part of
the ledger (a test checks them in place).

Used by every end-to-end test and usable from a soak script::

    from invariant import DropLedger, Folders, check_invariant
    ledger = DropLedger()
    ledger.record(path_in_inbox)              # after each drop (or ledger.add(name, sha))
    ...stop the daemon...
    print(check_invariant(ledger, Folders.from_config_file(cfg)).describe())

A file keeps its name when filed unless the name was taken in its folder, in which case it
gets ``name (2).ext``; the check therefore matches dropped files to disk files by
(name without such a suffix, sha256) as a multiset, so identical copies under different
names are told apart and a duplicate is never mistaken for a second drop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

TMP_PREFIX = ".segd-tmp-"
REASONS_FILE = "reasons.tsv"
_SUFFIX = re.compile(r" \((\d+)\)(?=\.[^.]*$|$)")


class Dropped(NamedTuple):
    name: str  # the basename it was dropped under
    sha256: str  # of its bytes


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def symlink_digest(path: Path | bytes | str) -> str:
    """A symlink is identified by its link text (never by what it points to)."""
    return sha256_bytes(b"symlink\0" + os.fsencode(os.readlink(os.fsencode(path))))


def sha256_entry(path: Path) -> str:
    """sha256 of a regular file's bytes, or `symlink_digest` for a symlink (not followed)."""
    if os.path.islink(path):
        return symlink_digest(path)
    return sha256_file(path)


class DropLedger:
    """Every file dropped into the inbox, in drop order; optionally appended to a JSONL file
    so a soak script can survive its own restarts (``DropLedger.load(path)``)."""

    def __init__(self, journal: Path | None = None) -> None:
        self.items: list[Dropped] = []
        self._journal = journal

    def add(self, name: str, sha256: str) -> Dropped:
        item = Dropped(name, sha256)
        self.items.append(item)
        if self._journal is not None:
            with open(self._journal, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"name": name, "sha256": sha256}) + "\n")
        return item

    def record(self, path: Path, data: bytes | None = None) -> Dropped:
        """Record a file just dropped at `path` (hash its bytes, or `data` if given)."""
        digest = sha256_bytes(data) if data is not None else sha256_file(path)
        return self.add(os.fsdecode(os.path.basename(os.fsencode(path))), digest)

    def record_symlink(self, path: Path | bytes | str) -> Dropped:
        """Record a symlink just created in the inbox (identified by its link text)."""
        return self.add(os.fsdecode(os.path.basename(os.fsencode(path))), symlink_digest(path))

    @classmethod
    def load(cls, journal: Path) -> DropLedger:
        ledger = cls()
        if journal.exists():
            for line in journal.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    d = json.loads(line)
                    ledger.items.append(Dropped(d["name"], d["sha256"]))
        ledger._journal = journal
        return ledger

    def __iter__(self) -> Iterator[Dropped]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Folders:
    inbox: Path
    library: Path
    quarantine: Path
    state_dir: Path

    @property
    def db(self) -> Path:
        return self.state_dir / "segd.db"

    @classmethod
    def from_config_file(cls, path: Path) -> Folders:
        from segd.config import parse_config_file

        c = parse_config_file(Path(path))
        return cls(c.inbox, c.library, c.quarantine, c.state_dir)


@dataclass
class Summary:
    dropped: int = 0
    sorted: int = 0  # files in library/*/
    quarantined: int = 0
    pending: int = 0  # dropped files still in the inbox
    pending_rows: int = 0  # of those, how many the store already knows as pending
    rows: int = 0
    per_folder: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        folders = ", ".join(f"{k}={v}" for k, v in sorted(self.per_folder.items()))
        return (f"{self.dropped} dropped: {self.sorted} sorted, {self.quarantined} "
                f"quarantined, {self.pending} pending in the inbox ({self.pending_rows} known "
                f"to the store); {self.rows} rows; folders: {folders}")


class InvariantError(AssertionError):
    pass


def canonical_name(name: str) -> str:
    """`a (2).jpg` -> `a.jpg`: the name a file had before a collision suffixed it."""
    return _SUFFIX.sub("", name, count=1)


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(Path(e.path) for e in os.scandir(folder)
                  if e.is_file(follow_symlinks=False) or e.is_symlink())


def _walk(root: Path) -> Iterator[Path]:
    if not root.exists():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            yield Path(dirpath) / name


def _show(paths: Iterable[object], limit: int = 30) -> str:
    items = [str(p) for p in paths]
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n    " + "\n    ".join(items[:limit]) + more


def check_invariant(
    dropped: Iterable[Dropped | tuple[str, str]] | Mapping[str, str],
    folders: Folders,
    *,
    open_moves_ok: bool = False,
    extra_files_ok: bool = False,
    outside: Iterable[Sentinel] = (),
) -> Summary:
    """Assert the invariant; return counts. Raises InvariantError (an AssertionError)
    listing every offending file.

    `dropped`: every file ever dropped, as (name, sha256) pairs or a {name: sha256} map.
    `open_moves_ok`: tolerate open journal rows (only while the daemon is still running or
    was killed; after a clean stop there must be none).
    `extra_files_ok`: tolerate files nobody dropped (e.g. a soak that also writes by hand).
    `outside`: snapshots of folders segd must never touch; each must be exactly as taken.
    """
    items = list(dropped.items()) if isinstance(dropped, Mapping) else list(dropped)
    problems: list[str] = []
    inbox, library, quarantine = folders.inbox, folders.library, folders.quarantine

    # ---- the disk: where every dropped file is now
    inbox_files = [p for p in _files(inbox) if not p.name.startswith(TMP_PREFIX)]
    quarantine_files = [p for p in _files(quarantine)
                        if p.name != REASONS_FILE and not p.name.startswith(TMP_PREFIX)]
    library_files: list[Path] = []
    per_folder: dict[str, int] = {}
    stray_in_library: list[Path] = []
    if library.is_dir():
        for entry in sorted(library.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                files = [p for p in _files(entry) if not p.name.startswith(TMP_PREFIX)]
                library_files.extend(files)
                per_folder[entry.name] = len(files)
                stray_in_library.extend(p for p in entry.iterdir() if p.is_dir())
            elif not entry.name.startswith(TMP_PREFIX):
                stray_in_library.append(entry)
    if stray_in_library:
        problems.append("unexpected entries in the library (only cluster folders of files "
                        "belong there):" + _show(stray_in_library))

    hashes: dict[Path, str] = {}
    for path in inbox_files + quarantine_files + library_files:
        try:
            hashes[path] = sha256_entry(path)
        except OSError as exc:
            problems.append(f"cannot read {path}: {exc}")

    want = Counter((canonical_name(n), h) for n, h in items)
    where: dict[tuple[str, str], list[Path]] = {}
    for path, digest in hashes.items():
        where.setdefault((canonical_name(path.name), digest), []).append(path)
    have = Counter({key: len(paths) for key, paths in where.items()})

    missing = want - have
    if missing:
        names = {canonical_name(n): n for n, _ in items}
        lost = []
        for (name, digest), count in sorted(missing.items()):
            same_name = [p for p in hashes if canonical_name(p.name) == name]
            note = (f" (a file of that name exists with other bytes: "
                    f"{', '.join(str(p) for p in same_name)})" if same_name else "")
            lost.append(f"{names.get(name, name)} sha256={digest[:12]} x{count}{note}")
        problems.append(f"{sum(missing.values())} dropped file(s) missing or altered:"
                        + _show(lost))
    surplus = have - want
    if surplus:
        dup: list[str] = []
        extra: list[str] = []
        for key in sorted(surplus):
            listed = [f"{p} (sha256={key[1][:12]})" for p in where[key]]
            (dup if key in want else extra).extend(listed)
        if dup:
            problems.append("dropped file(s) present more than once (every copy listed):"
                            + _show(dup))
        if extra and not extra_files_ok:
            problems.append("file(s) nobody dropped (altered, truncated or foreign):"
                            + _show(extra))

    # ---- no temporary files anywhere
    roots = {inbox, library, quarantine, folders.state_dir}
    temps = sorted({p for root in roots for p in _walk(root) if p.name.startswith(TMP_PREFIX)})
    if temps:
        problems.append("leftover temporary files:" + _show(temps))

    # ---- the store agrees with the disk
    summary = Summary(dropped=len(items), sorted=len(library_files),
                      quarantined=len(quarantine_files), per_folder=per_folder)
    pending_inbox = {p for p in inbox_files if (canonical_name(p.name), hashes.get(p)) in want}
    summary.pending = len(pending_inbox)
    if folders.db.exists():
        _check_store(folders, hashes, library_files, quarantine_files, inbox_files,
                     open_moves_ok, problems, summary)
    elif library_files or quarantine_files:
        problems.append(f"files were filed but there is no store at {folders.db}")

    # ---- nothing outside segd's folders was created, changed or deleted
    for sentinel in outside:
        changes = sentinel.changes()
        if changes:
            problems.append(f"changes outside segd's folders, under {sentinel.root}:"
                            + _show(changes))

    if problems:
        raise InvariantError("segd invariant violated:\n- " + "\n- ".join(problems)
                             + f"\n(state: {summary.describe()})")
    return summary


def _check_store(folders: Folders, hashes: dict[Path, str], library_files: list[Path],
                 quarantine_files: list[Path], inbox_files: list[Path], open_moves_ok: bool,
                 problems: list[str], summary: Summary) -> None:
    from segd.state.store import open_store

    inbox, library, quarantine = folders.inbox, folders.library, folders.quarantine
    store = open_store(folders.db, readonly=True)
    try:
        with store.snapshot():
            rows = list(store.iter_images())
            clusters = {c.id: c for c in store.clusters(active_only=False)}
            moves = store.pending_moves()
    finally:
        store.close()
    summary.rows = len(rows)

    by_path: dict[Path, list[object]] = {}
    bad_rows: list[str] = []
    for row in rows:
        by_path.setdefault(row.path, []).append(row)
        label = f"row {row.id} ({row.state}) {row.path}"
        if not os.path.lexists(row.path):
            bad_rows.append(f"{label}: no such file")
            continue
        digest = hashes.get(row.path)
        if digest is None:
            try:
                digest = sha256_entry(row.path)
            except OSError as exc:
                bad_rows.append(f"{label}: unreadable: {exc}")
                continue
        if row.sha256:
            if row.sha256 != digest:
                bad_rows.append(f"{label}: row sha256 {row.sha256[:12]} != file {digest[:12]}")
        elif row.state != "quarantined":
            bad_rows.append(f"{label}: empty sha256 on a row that is not quarantined")
        parent = row.path.parent
        if parent == quarantine:
            expected = "quarantined"
        elif parent.parent == library:
            expected = "sorted"
        elif parent == inbox:
            expected = "pending"
        else:
            bad_rows.append(f"{label}: outside the inbox, the library and the quarantine")
            continue
        if row.state != expected:
            bad_rows.append(f"{label}: state {row.state!r} but the file lies where "
                            f"{expected!r} files do")
        if row.state == "sorted":
            cluster = clusters.get(row.cluster_id) if row.cluster_id is not None else None
            if cluster is None:
                bad_rows.append(f"{label}: sorted without a known cluster "
                                f"(cluster_id={row.cluster_id})")
            elif cluster.folder != parent.name:
                bad_rows.append(f"{label}: cluster {cluster.id}'s folder is "
                                f"{cluster.folder!r}, but the file lies in {parent.name!r}")
            if row.embedding is None:
                bad_rows.append(f"{label}: sorted without an embedding")
        if row.state == "quarantined" and not row.reason:
            bad_rows.append(f"{label}: quarantined without a reason")
        if row.state == "pending":
            summary.pending_rows += 1
    if bad_rows:
        problems.append("store rows that disagree with the disk:" + _show(bad_rows))

    unrowed = [p for p in library_files + quarantine_files if p not in by_path]
    if unrowed:
        problems.append("files in the library/quarantine without a store row:" + _show(unrowed))
    # the path column is UNIQUE, but say so if it ever is not
    multi = [p for p, rs in by_path.items() if len(rs) > 1]
    if multi:
        problems.append("paths with more than one store row:" + _show(multi))
    if moves and not open_moves_ok:
        problems.append("open journal rows (moves) after a clean stop:"
                        + _show(f"move {m.id}: {m.src} -> {m.dst} ({m.state})" for m in moves))


# ---- folders segd must never touch


def _describe_entry(path: Path) -> tuple[object, ...]:
    st = os.lstat(path)
    if os.path.islink(path):
        return ("symlink", os.readlink(path))
    if os.path.isdir(path):
        return ("dir", st.st_mode, st.st_uid)
    if os.path.isfile(path):
        return ("file", st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_ino,
                sha256_file(path))
    return ("other", st.st_mode, st.st_rdev, st.st_ino)


def snapshot_tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under `root` (root included, symlinks not followed): kind, mode, owner,
    size, mtime, inode and content hash, keyed by relative path."""
    root = Path(root)
    out: dict[str, tuple[object, ...]] = {}
    if not os.path.lexists(root):
        return out
    out["."] = _describe_entry(root)
    if os.path.isdir(root) and not os.path.islink(root):
        for path in _walk(root):
            out[os.fsdecode(os.path.relpath(path, root))] = _describe_entry(path)
    return out


@dataclass
class Sentinel:
    """A folder (or file) segd must leave alone, as it was when `take` snapshotted it."""

    root: Path
    before: dict[str, tuple[object, ...]]

    @classmethod
    def take(cls, root: Path) -> Sentinel:
        return cls(Path(root), snapshot_tree(Path(root)))

    @classmethod
    def plant(cls, root: Path, photo: Path | None = None) -> Sentinel:
        """Create `root` with a few files (and a copy of `photo`), then snapshot it."""
        root = Path(root)
        (root / "sub").mkdir(parents=True, exist_ok=True)
        (root / "notes.txt").write_text("segd must not touch this\n", encoding="utf-8")
        (root / "sub" / "data.bin").write_bytes(os.urandom(4096))
        if photo is not None:
            (root / "photo.jpg").write_bytes(Path(photo).read_bytes())
        return cls.take(root)

    def changes(self) -> list[str]:
        after = snapshot_tree(self.root)
        out = [f"deleted: {k}" for k in sorted(self.before.keys() - after.keys())]
        out += [f"created: {k}" for k in sorted(after.keys() - self.before.keys())]
        out += [f"changed: {k}: {self.before[k]} -> {after[k]}"
                for k in sorted(self.before.keys() & after.keys()) if self.before[k] != after[k]]
        return out
