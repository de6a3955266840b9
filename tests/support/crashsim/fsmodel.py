"""A folder tree as inodes, and the logical operations that change it.

Directories map names to inode numbers; files hold bytes. Operations name inodes, not
paths (the recorder resolves each path when the call is made), so any subset of them can
be applied: a write whose file was never linked anywhere changes an orphan nobody sees,
a link made by a kept operation names its inode even if the create before it was dropped.
That is what lets a crash state drop an operation the file system had not made durable.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT_INO = 1


@dataclass
class Inode:
    kind: str  # "file", "dir", "symlink"
    mode: int = 0o644
    data: bytearray = field(default_factory=bytearray)  # file bytes or symlink target
    entries: dict[bytes, int] = field(default_factory=dict)  # dir only

    def copy(self) -> Inode:
        return Inode(self.kind, self.mode, bytearray(self.data), dict(self.entries))


# ---- operations (each names the objects it changes: `objects`)


@dataclass(frozen=True)
class Op:
    seq: int  # the system call it came from (for reports)
    call: str

    @property
    def objects(self) -> tuple[int, ...]:
        raise NotImplementedError

    def apply(self, img: Image) -> None:
        raise NotImplementedError

    @property
    def is_data(self) -> bool:
        return False

    def describe(self, names: dict[int, str]) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Write(Op):
    ino: int
    offset: int
    data: bytes

    @property
    def objects(self) -> tuple[int, ...]:
        return (self.ino,)

    @property
    def is_data(self) -> bool:
        return True

    def apply(self, img: Image) -> None:
        buf = img.file(self.ino).data
        end = self.offset + len(self.data)
        if len(buf) < self.offset:
            buf.extend(b"\0" * (self.offset - len(buf)))
        buf[self.offset:end] = self.data

    def describe(self, names: dict[int, str]) -> str:
        return f"write {names.get(self.ino, self.ino)} [{self.offset}+{len(self.data)}]"


@dataclass(frozen=True)
class Truncate(Op):
    ino: int
    size: int

    @property
    def objects(self) -> tuple[int, ...]:
        return (self.ino,)

    @property
    def is_data(self) -> bool:
        return True

    def apply(self, img: Image) -> None:
        buf = img.file(self.ino).data
        if len(buf) > self.size:
            del buf[self.size:]
        else:
            buf.extend(b"\0" * (self.size - len(buf)))

    def describe(self, names: dict[int, str]) -> str:
        return f"truncate {names.get(self.ino, self.ino)} to {self.size}"


@dataclass(frozen=True)
class Create(Op):
    """A new inode gets its first name (creat, mkdir, symlink)."""

    dir: int
    name: bytes
    ino: int
    kind: str
    mode: int
    target: bytes = b""  # symlink text

    @property
    def objects(self) -> tuple[int, ...]:
        return (self.dir,)

    def apply(self, img: Image) -> None:
        node = img.inodes.setdefault(self.ino, Inode(self.kind, self.mode))
        if self.kind == "symlink":
            node.data = bytearray(self.target)
        img.dir(self.dir).entries[self.name] = self.ino

    def describe(self, names: dict[int, str]) -> str:
        return f"{self.call} {names.get(self.dir, self.dir)}/{os.fsdecode(self.name)}"


@dataclass(frozen=True)
class Link(Op):
    dir: int
    name: bytes
    ino: int

    @property
    def objects(self) -> tuple[int, ...]:
        return (self.dir,)

    def apply(self, img: Image) -> None:
        img.dir(self.dir).entries[self.name] = self.ino

    def describe(self, names: dict[int, str]) -> str:
        return f"link {names.get(self.ino, self.ino)} as " \
               f"{names.get(self.dir, self.dir)}/{os.fsdecode(self.name)}"


@dataclass(frozen=True)
class Unlink(Op):
    """A name goes (unlink, rmdir): only if it still names the inode it named then."""

    dir: int
    name: bytes
    ino: int

    @property
    def objects(self) -> tuple[int, ...]:
        return (self.dir,)

    def apply(self, img: Image) -> None:
        entries = img.dir(self.dir).entries
        if entries.get(self.name) == self.ino:
            del entries[self.name]

    def describe(self, names: dict[int, str]) -> str:
        return f"{self.call} {names.get(self.dir, self.dir)}/{os.fsdecode(self.name)}"


@dataclass(frozen=True)
class Rename(Op):
    """Atomic: the new name and the removal of the old one persist together or not at all."""

    src_dir: int
    src_name: bytes
    dst_dir: int
    dst_name: bytes
    ino: int

    @property
    def objects(self) -> tuple[int, ...]:
        return tuple(sorted({self.src_dir, self.dst_dir}))

    def apply(self, img: Image) -> None:
        src = img.dir(self.src_dir).entries
        if src.get(self.src_name) == self.ino:
            del src[self.src_name]
        img.dir(self.dst_dir).entries[self.dst_name] = self.ino

    def describe(self, names: dict[int, str]) -> str:
        return (f"rename {names.get(self.src_dir, self.src_dir)}/{os.fsdecode(self.src_name)}"
                f" -> {names.get(self.dst_dir, self.dst_dir)}/{os.fsdecode(self.dst_name)}")


@dataclass(frozen=True)
class Sync(Op):
    """fsync/fdatasync of one inode (a file: its data; a directory: its entries), or of
    everything (sync, syncfs: ino None). Covers what had returned before `start`."""

    ino: int | None
    start: int

    @property
    def objects(self) -> tuple[int, ...]:
        return ()

    def apply(self, img: Image) -> None:
        return None

    def describe(self, names: dict[int, str]) -> str:
        what = "everything" if self.ino is None else names.get(self.ino, str(self.ino))
        return f"{self.call} {what}"


# ---- the tree


@dataclass
class Image:
    inodes: dict[int, Inode]

    def copy(self) -> Image:
        return Image({n: i.copy() for n, i in self.inodes.items()})

    def file(self, ino: int) -> Inode:
        return self.inodes.setdefault(ino, Inode("file"))

    def dir(self, ino: int) -> Inode:
        return self.inodes.setdefault(ino, Inode("dir", 0o755))

    def lookup(self, parts: list[bytes]) -> int | None:
        ino = ROOT_INO
        for part in parts:
            node = self.inodes.get(ino)
            if node is None or node.kind != "dir" or part not in node.entries:
                return None
            ino = node.entries[part]
        return ino

    def paths(self) -> dict[int, list[bytes]]:
        """Every reachable inode and its names (relative paths), in a stable order."""
        out: dict[int, list[bytes]] = {}
        todo: list[tuple[bytes, int]] = [(b"", ROOT_INO)]
        seen_dirs: set[int] = set()
        while todo:
            prefix, ino = todo.pop()
            node = self.inodes.get(ino)
            if node is None or node.kind != "dir" or ino in seen_dirs:
                continue
            seen_dirs.add(ino)
            for name in sorted(node.entries):
                child = node.entries[name]
                rel = prefix + name
                out.setdefault(child, []).append(rel)
                todo.append((rel + b"/", child))
        return out

    def digest(self, cache: dict[int, bytes] | None = None,
               fresh: Collection[int] = ()) -> str:
        """Identifies what a crash would leave on disk (names, links, kinds, bytes). File
        hashes are kept in `cache` by inode, except for the inodes in `fresh`."""
        cache = {} if cache is None else cache
        h = hashlib.sha256()
        for ino, names in sorted(self.paths().items(), key=lambda kv: kv[1]):
            node = self.inodes[ino]
            h.update(b"\0".join(sorted(names)) + b"\1" + node.kind.encode())
            if node.kind != "dir":
                digest = None if ino in fresh else cache.get(ino)
                if digest is None:
                    digest = hashlib.sha256(bytes(node.data)).digest()
                    if ino not in fresh:
                        cache[ino] = digest
                h.update(digest)
        return h.hexdigest()

    # ---- to and from a real folder

    @classmethod
    def from_disk(cls, root: Path, include: Iterable[str], skip: Iterable[str] = ()) -> Image:
        """The folders `include` under `root` (hard links kept as one inode); names in
        `skip` left out wherever they are."""
        include, skip = set(include), set(skip)
        img = cls({ROOT_INO: Inode("dir", stat.S_IMODE(os.lstat(root).st_mode))})
        by_ino: dict[tuple[int, int], int] = {}
        next_ino = ROOT_INO + 1

        def walk(path: bytes, ino: int) -> None:
            nonlocal next_ino
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                name = os.fsdecode(entry.name)
                if name in skip or (ino == ROOT_INO and name not in include):
                    continue
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if key in by_ino:
                    img.inodes[ino].entries[entry.name] = by_ino[key]
                    continue
                if stat.S_ISDIR(st.st_mode):
                    node = Inode("dir", stat.S_IMODE(st.st_mode))
                elif stat.S_ISLNK(st.st_mode):
                    node = Inode("symlink", 0o777, bytearray(os.readlink(entry.path)))
                elif stat.S_ISREG(st.st_mode):
                    with open(entry.path, "rb") as fh:
                        node = Inode("file", stat.S_IMODE(st.st_mode), bytearray(fh.read()))
                else:
                    continue  # sockets, FIFOs: nothing a crash keeps that matters here
                child = next_ino
                next_ino += 1
                by_ino[key] = child
                img.inodes[child] = node
                img.inodes[ino].entries[entry.name] = child
                if node.kind == "dir":
                    walk(entry.path, child)

        walk(os.fsencode(root), ROOT_INO)
        return img

    def materialize(self, root: Path, inodes: Mapping[int, Path] | None = None) -> None:
        """Write the tree under `root` (its top-level names must be absent), links as links.

        `inodes` maps model inodes to a file that holds the real inode they stood for (a
        hard link kept aside): such a file is rewritten to the state's bytes and linked into
        place, so it keeps its inode number as it would through a power cut (segd follows
        files by identity). Other files, and every folder, are created afresh."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        base = os.fsencode(root) + b"/"
        first: dict[int, bytes] = {}
        items = sorted(((rel, ino) for ino, rels in self.paths().items() for rel in rels),
                       key=lambda x: x[0].count(b"/"))
        for rel, ino in items:
            node = self.inodes[ino]
            path = base + rel
            if ino in first and node.kind != "dir":
                os.link(first[ino], path)
                continue
            first[ino] = path
            if node.kind == "dir":
                os.mkdir(path, node.mode or 0o755)
            elif node.kind == "symlink":
                os.symlink(bytes(node.data), path)
            elif inodes is not None and ino in inodes:
                kept = inodes[ino]
                if kept.read_bytes() != node.data:
                    _write_all(kept, node.data, os.O_WRONLY | os.O_TRUNC, node.mode)
                os.chmod(kept, node.mode or 0o644)
                os.link(kept, path)
            else:
                _write_all(path, node.data, os.O_WRONLY | os.O_CREAT | os.O_EXCL, node.mode)


def _write_all(path: bytes | Path, data: bytearray, flags: int, mode: int) -> None:
    fd = os.open(path, flags, mode or 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
