"""From strace's system calls to logical operations on the inodes of one folder tree.

The recorder keeps what the kernel kept for the traced program: a descriptor table per
process (threads share one, a forked child gets a copy whose open files it shares), each
open file's offset, and the tree itself as it is after every call (`Image`), so that each
path is resolved to an inode when the call is made. Calls outside the tree are dropped;
calls the model cannot express inside it (a rename that exchanges, bytes spliced in) raise
`Unmodelled` rather than being guessed at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from crashsim.fsmodel import (
    ROOT_INO,
    Create,
    Image,
    Link,
    Op,
    Rename,
    Sync,
    Truncate,
    Unlink,
    Write,
)
from crashsim.strace import Syscall, fd_arg, string_arg, unhex


class Unmodelled(Exception):
    """A call inside the tree that the model cannot reproduce."""


@dataclass
class OpenFile:
    ino: int | None  # None: outside the tree
    offset: int = 0
    append: bool = False


@dataclass
class Recording:
    initial: Image
    ops: list[Op]
    final: Image  # the tree after every operation: must equal the disk after the run
    names: dict[int, str] = field(default_factory=dict)  # inode -> a path, for reports
    ignored: int = 0  # calls inside the tree on names the model leaves out (-shm, socket)


_O_FLAGS = {"O_CREAT": os.O_CREAT, "O_TRUNC": os.O_TRUNC, "O_APPEND": os.O_APPEND,
            "O_WRONLY": os.O_WRONLY, "O_RDWR": os.O_RDWR, "O_EXCL": os.O_EXCL,
            "O_TMPFILE": getattr(os, "O_TMPFILE", 0x410000)}
_IOV = re.compile(r'iov_base="((?:\\x[0-9a-f]{2})*)"')


def _flags(arg: str) -> int:
    out = 0
    for part in arg.split("|"):
        out |= _O_FLAGS.get(part.strip(), 0)
    return out


def _mode(arg: str) -> int:
    """A mode as strace prints it (octal: 0644, 0)."""
    return int(arg, 8)


class Replayer:
    """Feed it the syscalls in order; it appends operations and keeps the tree current."""

    def __init__(self, root: bytes, initial: Image, include: Iterable[str],
                 skip: Iterable[str] = ()) -> None:
        self.root = root.rstrip(b"/")
        self.include = {os.fsencode(n) for n in include}
        self.skip = {os.fsencode(n) for n in skip}
        self.initial = initial
        self.img = initial.copy()
        self.ops: list[Op] = []
        self.tables: dict[int, dict[int, OpenFile]] = {}
        self.clones: dict[int, tuple[int, bool]] = {}  # child tid -> (parent, shares fds)
        self.next_ino = max(initial.inodes) + 1
        self.names: dict[int, str] = {ROOT_INO: "."}
        for ino, rels in initial.paths().items():
            self.names[ino] = os.fsdecode(rels[0])
        self.ignored = 0

    # ---- paths

    def _rel(self, path: bytes | None) -> list[bytes] | None:
        """Components below the root, or None when the path is outside the modelled tree."""
        if path is None:
            return None
        path = os.path.normpath(path)
        if path == self.root:
            return []
        if not path.startswith(self.root + b"/"):
            return None
        parts = path[len(self.root) + 1:].split(b"/")
        if parts[0] not in self.include or any(p in self.skip for p in parts):
            if parts[0] in self.include:
                self.ignored += 1
            return None
        return parts

    def _path(self, sc: Syscall, dirfd_arg: str | None, path_arg: str) -> bytes:
        path = string_arg(path_arg)
        if path.startswith(b"/") or dirfd_arg is None:
            if not path.startswith(b"/"):
                raise Unmodelled(f"relative path without a directory in {sc.name}")
            return path
        fd, base = fd_arg(dirfd_arg)
        if base is None:
            raise Unmodelled(f"{sc.name}: no path for descriptor {fd}")
        return base + b"/" + path

    def _table(self, tid: int) -> dict[int, OpenFile]:
        table = self.tables.get(tid)
        if table is None:
            parent, shares = self.clones.get(tid, (None, False))
            source = self.tables.get(parent) if parent is not None else None
            if source is None:
                table = {}
            elif shares:
                table = source
            else:
                table = dict(source)  # a copy of the table; the open files are shared
            self.tables[tid] = table
        return table

    def _emit(self, op: Op) -> None:
        op.apply(self.img)
        self.ops.append(op)

    def _new_ino(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        return ino

    # ---- calls

    def note_clones(self, calls: Iterable[Syscall]) -> None:
        """First pass: who started which thread or process (a child's first calls may
        return before its parent's clone does)."""
        for sc in calls:
            if sc.name in ("clone", "clone3", "fork", "vfork") and not sc.failed:
                shares = "CLONE_FILES" in ",".join(sc.args)
                self.clones[sc.retval] = (sc.tid, shares)

    def feed(self, sc: Syscall) -> None:
        table = self._table(sc.tid)
        if sc.failed:
            return
        handler = getattr(self, f"_do_{sc.name}", None)
        if handler is not None:
            handler(sc, table)

    def _open(self, sc: Syscall, table: dict[int, OpenFile], flags: int, mode: int) -> None:
        fd, path = fd_arg(sc.ret)
        assert fd is not None
        parts = self._rel(path)
        if parts is None:
            table[fd] = OpenFile(None)
            return
        if flags & _O_FLAGS["O_TMPFILE"] == _O_FLAGS["O_TMPFILE"]:
            raise Unmodelled("O_TMPFILE inside the tree")
        ino = self.img.lookup(parts)
        if ino is None:
            if not flags & os.O_CREAT:
                raise Unmodelled(f"open of {path!r}, unknown to the model, without O_CREAT")
            parent = self._dir_of(parts, path)
            ino = self._new_ino()
            self.names[ino] = os.fsdecode(b"/".join(parts))
            self._emit(Create(sc.seq, sc.name, parent, parts[-1], ino, "file", mode & 0o7777))
        elif (flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR)
              and self.img.inodes[ino].data):
            self._emit(Truncate(sc.seq, "O_TRUNC", ino, 0))
        table[fd] = OpenFile(ino, 0, bool(flags & os.O_APPEND))

    def _dir_of(self, parts: list[bytes], path: bytes | None) -> int:
        parent = self.img.lookup(parts[:-1])
        if parent is None or self.img.inodes[parent].kind != "dir":
            raise Unmodelled(f"{path!r}: its folder is unknown to the model")
        return parent

    def _do_openat(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        mode = _mode(sc.args[3]) if len(sc.args) > 3 else 0o644
        self._open(sc, table, _flags(sc.args[2]), mode)

    def _do_open(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        mode = _mode(sc.args[2]) if len(sc.args) > 2 else 0o644
        self._open(sc, table, _flags(sc.args[1]), mode)

    def _do_creat(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._open(sc, table, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, _mode(sc.args[1]))

    def _do_openat2(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        if self._rel(fd_arg(sc.ret)[1]) is not None:
            raise Unmodelled("openat2 inside the tree")
        table[sc.retval] = OpenFile(None)

    def _do_close(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        table.pop(fd_arg(sc.args[0])[0] or -1, None)

    def _do_close_range(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        lo, hi = int(sc.args[0], 0), int(sc.args[1], 0)
        for fd in [fd for fd in table if lo <= fd <= hi]:
            del table[fd]

    def _dup(self, table: dict[int, OpenFile], old: int | None, new: int) -> None:
        if old is not None and old in table:
            table[new] = table[old]  # one open file, one offset
        else:
            table.pop(new, None)

    def _do_dup(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._dup(table, fd_arg(sc.args[0])[0], sc.retval)

    _do_dup2 = _do_dup
    _do_dup3 = _do_dup

    def _do_fcntl(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        if sc.args[1] in ("F_DUPFD", "F_DUPFD_CLOEXEC"):
            self._dup(table, fd_arg(sc.args[0])[0], sc.retval)

    def _do_lseek(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        of = table.get(fd_arg(sc.args[0])[0] or -1)
        if of is not None:
            of.offset = sc.retval

    def _write(self, sc: Syscall, of: OpenFile | None, data: bytes,
               offset: int | None) -> None:
        if of is None:
            return
        at = offset
        if at is None:
            at = len(self.img.inodes[of.ino].data) if of.append and of.ino else of.offset
            of.offset = at + len(data)
        if of.ino is not None and data:
            self._emit(Write(sc.seq, sc.name, of.ino, at, data))

    def _do_write(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        of = table.get(fd_arg(sc.args[0])[0] or -1)
        if of is not None:
            self._write(sc, of, string_arg(sc.args[1])[: sc.retval], None)

    def _do_pwrite64(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        of = table.get(fd_arg(sc.args[0])[0] or -1)
        if of is not None:
            self._write(sc, of, string_arg(sc.args[1])[: sc.retval], int(sc.args[3], 0))

    def _iov(self, arg: str) -> bytes:
        return b"".join(unhex(m) for m in _IOV.findall(arg))

    def _do_writev(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        of = table.get(fd_arg(sc.args[0])[0] or -1)
        if of is not None:
            self._write(sc, of, self._iov(sc.args[1])[: sc.retval], None)

    def _do_pwritev(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        of = table.get(fd_arg(sc.args[0])[0] or -1)
        if of is not None:
            self._write(sc, of, self._iov(sc.args[1])[: sc.retval], int(sc.args[3], 0))

    _do_pwritev2 = _do_pwritev

    def _do_ftruncate(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        of = table.get(fd_arg(sc.args[0])[0] or -1)
        if of is not None and of.ino is not None:
            self._emit(Truncate(sc.seq, sc.name, of.ino, int(sc.args[1], 0)))

    def _do_truncate(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        parts = self._rel(self._path(sc, None, sc.args[0]))
        ino = self.img.lookup(parts) if parts else None
        if ino is not None:
            self._emit(Truncate(sc.seq, sc.name, ino, int(sc.args[1], 0)))

    def _do_fallocate(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        of = table.get(fd_arg(sc.args[0])[0] or -1)
        if of is None or of.ino is None:
            return
        if sc.args[1] != "0":
            raise Unmodelled(f"fallocate mode {sc.args[1]} inside the tree")
        end = int(sc.args[2], 0) + int(sc.args[3], 0)
        if end > len(self.img.inodes[of.ino].data):
            self._emit(Truncate(sc.seq, sc.name, of.ino, end))

    def _sync(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        of = table.get(fd_arg(sc.args[0])[0] or -1)
        if of is not None and of.ino is not None:
            self._emit(Sync(sc.seq, sc.name, of.ino, sc.start))

    _do_fsync = _sync
    _do_fdatasync = _sync

    def _do_sync(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._emit(Sync(sc.seq, sc.name, None, sc.start))

    _do_syncfs = _do_sync

    def _rename(self, sc: Syscall, old: bytes, new: bytes) -> None:
        src, dst = self._rel(old), self._rel(new)
        if src is None and dst is None:
            return
        if src is None or dst is None:
            raise Unmodelled(f"rename across the edge of the tree: {old!r} -> {new!r}")
        ino = self.img.lookup(src)
        if ino is None:
            raise Unmodelled(f"rename of {old!r}, unknown to the model")
        op = Rename(sc.seq, sc.name, self._dir_of(src, old), src[-1], self._dir_of(dst, new),
                    dst[-1], ino)
        self.names[ino] = os.fsdecode(b"/".join(dst))
        self._emit(op)

    def _do_rename(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._rename(sc, self._path(sc, None, sc.args[0]), self._path(sc, None, sc.args[1]))

    def _do_renameat(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._rename(sc, self._path(sc, sc.args[0], sc.args[1]),
                     self._path(sc, sc.args[2], sc.args[3]))

    def _do_renameat2(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        if "RENAME_EXCHANGE" in sc.args[4]:
            raise Unmodelled("renameat2 RENAME_EXCHANGE")
        self._do_renameat(sc, table)

    def _link(self, sc: Syscall, old: bytes, new: bytes) -> None:
        src, dst = self._rel(old), self._rel(new)
        if dst is None:
            return
        ino = self.img.lookup(src) if src is not None else None
        if ino is None:
            raise Unmodelled(f"link of {old!r}, unknown to the model, into the tree")
        self._emit(Link(sc.seq, sc.name, self._dir_of(dst, new), dst[-1], ino))

    def _do_link(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._link(sc, self._path(sc, None, sc.args[0]), self._path(sc, None, sc.args[1]))

    def _do_linkat(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._link(sc, self._path(sc, sc.args[0], sc.args[1]),
                   self._path(sc, sc.args[2], sc.args[3]))

    def _unlink(self, sc: Syscall, path: bytes, call: str) -> None:
        parts = self._rel(path)
        if parts is None:
            return
        ino = self.img.lookup(parts)
        if ino is None:
            self.ignored += 1  # a name the model never saw made (a socket)
            return
        self._emit(Unlink(sc.seq, call, self._dir_of(parts, path), parts[-1], ino))

    def _do_unlink(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._unlink(sc, self._path(sc, None, sc.args[0]), "unlink")

    def _do_rmdir(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._unlink(sc, self._path(sc, None, sc.args[0]), "rmdir")

    def _do_unlinkat(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        call = "rmdir" if "AT_REMOVEDIR" in sc.args[2] else "unlink"
        self._unlink(sc, self._path(sc, sc.args[0], sc.args[1]), call)

    def _mkdir(self, sc: Syscall, path: bytes, mode: int) -> None:
        parts = self._rel(path)
        if parts is None:
            return
        ino = self._new_ino()
        self.names[ino] = os.fsdecode(b"/".join(parts))
        self._emit(Create(sc.seq, "mkdir", self._dir_of(parts, path), parts[-1], ino, "dir",
                          mode & 0o7777))

    def _do_mkdir(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._mkdir(sc, self._path(sc, None, sc.args[0]), _mode(sc.args[1]))

    def _do_mkdirat(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._mkdir(sc, self._path(sc, sc.args[0], sc.args[1]), _mode(sc.args[2]))

    def _symlink(self, sc: Syscall, target: bytes, path: bytes) -> None:
        parts = self._rel(path)
        if parts is None:
            return
        ino = self._new_ino()
        self.names[ino] = os.fsdecode(b"/".join(parts))
        self._emit(Create(sc.seq, "symlink", self._dir_of(parts, path), parts[-1], ino,
                          "symlink", 0o777, target))

    def _do_symlink(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._symlink(sc, string_arg(sc.args[0]), self._path(sc, None, sc.args[1]))

    def _do_symlinkat(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        self._symlink(sc, string_arg(sc.args[0]), self._path(sc, sc.args[1], sc.args[2]))

    def _spliced(self, sc: Syscall, table: dict[int, OpenFile]) -> None:
        out = sc.args[2] if sc.name == "splice" else sc.args[0]
        of = table.get(fd_arg(out.split(",")[0])[0] or -1)
        if of is not None and of.ino is not None:
            raise Unmodelled(f"{sc.name} into a file of the tree")

    _do_copy_file_range = _spliced
    _do_sendfile = _spliced
    _do_splice = _spliced

    def recording(self) -> Recording:
        return Recording(self.initial, self.ops, self.img, self.names, self.ignored)


def replay(calls: list[Syscall], root: bytes, initial: Image, include: Iterable[str],
           skip: Iterable[str] = ()) -> Recording:
    """The operations `calls` made on the tree that starts as `initial`."""
    r = Replayer(root, initial, include, skip)
    r.note_clones(calls)
    for sc in calls:
        r.feed(sc)
    return r.recording()
