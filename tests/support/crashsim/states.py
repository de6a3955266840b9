"""The states a power cut could leave, from a recorded list of operations.

A crash after the first `prefix` operations keeps every operation that had been made
durable and any subset of the others. What "durable" means is the persistence model
(docs/reliability.md, "Power loss: crash-state exploration"):

- `posix`: only what fsync promises. A write or truncate of a file is durable once an
  fsync/fdatasync of that file has been called after it returned; a directory entry
  (create, mkdir, link, unlink, rmdir) once its directory has been fsynced after it; a
  rename once every directory it touched has been. Anything else may be lost, in any
  combination, whatever came after it: a rename may persist without the data of the file
  it names, a link without the mkdir of its folder.
- `ext4`: as ext4 in data=ordered mode behaves with its journal: directory operations
  persist in the order they were made, and every fsync (of anything) commits all of them
  made before it; file data is still durable only through an fsync of the file.

The choices per prefix are bounded: keep everything (what `kill -9` leaves), drop each
non-durable unit, each pair of them, or all of them (`posix`); every cut of the journal,
with the data units dropped singly or all together (`ext4`). A unit is one directory
operation, or all the not-yet-durable writes of one file (`torn=True`: each page-sized
piece of each write, which exposes torn writes). States that would leave the same bytes
under the same names are explored once.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from crashsim.fsmodel import Create, Image, Inode, Op, Rename, Sync, Write

PAGE = 4096
MODELS = ("posix", "ext4")


@dataclass(frozen=True)
class CrashState:
    prefix: int  # operations [0, prefix) were issued before the power went
    dropped: frozenset[int]  # of those, the ones the disk did not keep

    @property
    def kind(self) -> str:
        return "power loss" if self.dropped else "kill -9"


def split_pages(ops: list[Op]) -> list[Op]:
    """Each write cut at page boundaries: a power cut may keep some pages and not others."""
    out: list[Op] = []
    for op in ops:
        if not isinstance(op, Write):
            out.append(op)
            continue
        pos, end = op.offset, op.offset + len(op.data)
        while pos < end:
            cut = min(end, (pos // PAGE + 1) * PAGE)
            out.append(Write(op.seq, op.call, op.ino, pos,
                             op.data[pos - op.offset: cut - op.offset]))
            pos = cut
    return out


class Explorer:
    """Crash states of one recording under one persistence model."""

    def __init__(self, initial: Image, ops: list[Op], model: str = "posix",
                 torn: bool = False, pairs: bool = True) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown persistence model {model!r}")
        self.initial = initial
        self.ops = split_pages(ops) if torn else list(ops)
        self.model = model
        self.torn = torn
        self.pairs = pairs
        self.durable_at = self._durable_at()
        self.by_object: dict[int, list[int]] = {}
        for i, op in enumerate(self.ops):
            for obj in op.objects:
                self.by_object.setdefault(obj, []).append(i)

    # ---- durability

    def _durable_at(self) -> list[int]:
        """For each operation, the index of the first sync that makes it durable
        (len(ops) if none does). A sync covers what returned before it was called."""
        n = len(self.ops)
        syncs = [(i, op) for i, op in enumerate(self.ops) if isinstance(op, Sync)]
        seqs = [op.seq for op in self.ops]
        out = [n] * n
        for i, op in enumerate(self.ops):
            if isinstance(op, Sync):
                out[i] = i
                continue
            if self.model == "ext4" and not op.is_data:
                need: set[int | None] = {None}  # any later fsync commits the journal
            elif isinstance(op, Rename):
                need = set(op.objects)
            else:
                need = {op.objects[0]}
            done: set[int | None] = set()
            for j, sync in syncs:
                if j <= i or sync.start <= seqs[i]:
                    continue
                target = sync.ino
                if target is None or (self.model == "ext4" and not op.is_data):
                    done = set(need)
                elif target in need:
                    done.add(target)
                if done >= need:
                    out[i] = j
                    break
        return out

    def pending(self, prefix: int) -> list[int]:
        """Issued operations not yet durable at `prefix`."""
        return [i for i in range(prefix)
                if self.durable_at[i] >= prefix and not isinstance(self.ops[i], Sync)]

    def units(self, pending: list[int]) -> list[tuple[int, ...]]:
        """What may be lost together: one directory operation, or one file's writes."""
        data: dict[int, list[int]] = {}
        out: list[tuple[int, ...]] = []
        for i in pending:
            op = self.ops[i]
            if op.is_data and not self.torn:
                data.setdefault(op.objects[0], []).append(i)
            else:
                out.append((i,))
        out.extend(tuple(v) for v in data.values())
        return sorted(out)

    # ---- enumeration

    def states(self) -> Iterator[CrashState]:
        """Every bounded choice at every prefix, in prefix order (not yet deduplicated)."""
        for prefix in range(len(self.ops) + 1):
            if prefix and isinstance(self.ops[prefix - 1], Sync):
                continue  # the same states as just before the sync, fewer of them
            yield from self._choices(prefix)

    def _choices(self, prefix: int) -> Iterator[CrashState]:
        pending = self.pending(prefix)
        yield CrashState(prefix, frozenset())
        if not pending:
            return
        if self.model == "ext4":
            meta = [i for i in pending if not self.ops[i].is_data]
            data = self.units([i for i in pending if self.ops[i].is_data])
            cuts = [frozenset(meta[c:]) for c in range(len(meta) + 1)]
            drops = [frozenset()] + [frozenset(u) for u in data]
            if len(data) > 1:
                drops.append(frozenset(i for u in data for i in u))
            for cut, drop in itertools.product(cuts, drops):
                if cut or drop:
                    yield CrashState(prefix, cut | drop)
            return
        units = self.units(pending)
        seen: set[frozenset[int]] = set()
        for size in (1, 2) if self.pairs else (1,):
            for combo in itertools.combinations(units, size):
                dropped = frozenset(i for u in combo for i in u)
                seen.add(dropped)
                yield CrashState(prefix, dropped)
        everything = frozenset(pending)
        if everything not in seen:
            yield CrashState(prefix, everything)

    # ---- building the tree a state leaves

    def images(self, states: list[CrashState]) -> Iterator[tuple[CrashState, Image, str]]:
        """(state, tree, digest) for each state, in prefix order. Each tree is only valid
        until the next one is produced (they share unchanged inodes with a running image)."""
        full = self.initial.copy()
        applied = 0
        hashes: dict[int, bytes] = {}
        for state in sorted(states, key=lambda s: (s.prefix, sorted(s.dropped))):
            while applied < state.prefix:
                op = self.ops[applied]
                op.apply(full)
                for ino in (*op.objects, *_touched(op)):
                    hashes.pop(ino, None)
                applied += 1
            if not state.dropped:
                yield state, full, full.digest(hashes)
                continue
            affected = {obj for i in state.dropped for obj in self.ops[i].objects}
            img = self._variant(full, state, affected)
            yield state, img, img.digest(hashes, affected)

    def _variant(self, full: Image, state: CrashState, affected: set[int]) -> Image:
        img = Image(dict(full.inodes))
        for obj in affected:
            base = self.initial.inodes.get(obj)
            node = base.copy() if base is not None else _fresh(full.inodes.get(obj))
            scratch = Image({obj: node})
            idx = self.by_object.get(obj, [])
            for i in idx[: bisect.bisect_left(idx, state.prefix)]:
                if i not in state.dropped:
                    self.ops[i].apply(scratch)
            img.inodes[obj] = node
        return img


def _touched(op: Op) -> tuple[int, ...]:
    return (op.ino,) if isinstance(op, Create) else ()


def _fresh(like: Inode | None) -> Inode:
    """An inode as it was created (the ops that fill it are replayed onto it)."""
    if like is None:
        return Inode("file")
    return Inode(like.kind, like.mode, bytearray(like.data) if like.kind == "symlink" else
                 bytearray())
