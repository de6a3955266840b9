"""Retry-safe placement for the Ray engine: every name decided and journaled before a file moves.

The driver decides each destination up front, collision suffixes included, against what
DEST already holds, and writes the plan atomically before the first file is placed. Slices
of the plan are then placed with segd's no-clobber link/copy (state.fsops), each outcome
appended to the slice's journal. A retried slice (its worker died, or the driver did and
runs again) skips what the journal records, and recognises a file it placed before it could
journal it: a regular file at the planned name (or a later suffix) with the source's size
and mtime and, while the source still exists, its inode or its bytes. So a retry neither
places a file twice nor overwrites one.
"""

from __future__ import annotations

import csv
import functools
import heapq
import itertools
import json
import logging
import math
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from segd.batch.shards import image_error
from segd.core.errors import ImageError
from segd.core.library import UNREADABLE_FOLDER
from segd.state import fsops

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"  # the same file, columns and rows as the local engine's
MANIFEST_HEADER = ["source", "destination", "cluster", "distance", "error"]
REASONS_HEADER = ["source", "destination", "kind", "reason"]
SAMPLES_PER_FOLDER = 8
PLAN_HEADER = ["index", "source", "size", "mtime_ns", "folder", "name", "slot", "cluster",
               "distance", "kind", "reason"]
_COMPARE_BLOCK = 1 << 20


@dataclass(frozen=True)
class PlanEntry:
    """Where one listed file goes."""

    index: int  # position in the plan
    source: Path
    size: int  # as listed: what a placed copy or link must still show
    mtime_ns: int
    folder: str  # a cluster folder, or UNREADABLE_FOLDER
    name: str  # the source's own name
    slot: int  # 1: `name` itself; i: the i-th of fsops.candidate_names(name); 0: no name
    # (an unreadable entry that is no regular file, e.g. a dangling link: left where it is)
    cluster: int = -1  # -1: an unreadable file, set aside
    distance: float = math.nan
    kind: str = ""  # for an unreadable file: why (ImageError kind and reason)
    reason: str = ""

    @property
    def readable(self) -> bool:
        return self.cluster >= 0

    @property
    def target_name(self) -> str:
        return candidate(self.name, self.slot)


@dataclass(frozen=True)
class Outcome:
    index: int
    final: str | None  # the name it was placed under; None: not placed
    error: str | None = None  # why a readable file could not be placed


@dataclass
class Manifest:
    """What the manifest says, for the command's report."""

    placed: int = 0
    unreadable: list[tuple[Path, ImageError]] = field(default_factory=list)
    samples: dict[str, list[Path]] = field(default_factory=dict)  # most typical first


def candidate(name: str, slot: int) -> str:
    return next(itertools.islice(fsops.candidate_names(name), slot - 1, None))


def decide_slots(dest: Path, wanted: Iterable[tuple[str, str]]) -> list[int]:
    """For each (folder, name) in order, the first candidate slot free in DEST and not yet
    given to an earlier file: the names the local engine's no-clobber placement would find."""
    taken: dict[str, set[str]] = {}
    slots = []
    for folder, name in wanted:
        names = taken.get(folder)
        if names is None:
            try:
                names = set(os.listdir(dest / folder))
            except FileNotFoundError:
                names = set()
            taken[folder] = names
        for slot, option in enumerate(fsops.candidate_names(name), start=1):
            if option not in names:
                names.add(option)
                slots.append(slot)
                break
        else:
            raise FileExistsError(f"no free name for {name} in {dest / folder}")
    return slots


# ---- the plan file


def write_plan(path: Path, entries: Sequence[PlanEntry]) -> None:
    """The plan, complete under its name or not at all (temporary name, fsync, rename)."""
    tmp = path.with_name(f"{fsops.TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            writer = csv.writer(fh)
            writer.writerow(PLAN_HEADER)
            writer.writerows([e.index, e.source, e.size, e.mtime_ns, e.folder, e.name, e.slot,
                              e.cluster, "" if math.isnan(e.distance) else repr(e.distance),
                              e.kind, e.reason] for e in entries)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsops.fsync_dir(path.parent)


def read_plan(path: Path) -> list[PlanEntry]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = csv.reader(fh)
        if next(rows) != PLAN_HEADER:
            raise ValueError(f"{path} is not a placement plan")
        return [PlanEntry(int(i), Path(src), int(size), int(mtime), folder, name, int(slot),
                          int(cluster), float(dist) if dist else math.nan, kind, reason)
                for i, src, size, mtime, folder, name, slot, cluster, dist, kind, reason
                in rows]


# ---- the journal of one slice


class Journal:
    """Append-only outcomes of one slice, a JSON line each; a torn last line is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO = path.open("ab")
        if self._fh.tell() and not _ends_with_newline(path):
            self._fh.write(b"\n")  # end a line torn by a crash before appending to it

    def record(self, outcome: Outcome) -> None:
        line = json.dumps([outcome.index, outcome.final, outcome.error])
        self._fh.write(line.encode("ascii") + b"\n")
        self._fh.flush()  # in the page cache: it survives the process being killed

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_journal(path: Path) -> dict[int, Outcome]:
    done: dict[int, Outcome] = {}
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return done
    for line in data.splitlines():
        try:
            index, final, error = json.loads(line)
        except ValueError:
            continue  # torn by a crash: that file is checked again
        done[int(index)] = Outcome(int(index), final, error)
    return done


# ---- placing


def place_slice(dest: Path, entries: Sequence[PlanEntry], journal: Path, *,
                move: bool) -> list[Outcome]:
    """Place the entries not yet journaled; return every entry's outcome."""
    done = read_journal(journal)
    outcomes = []
    with Journal(journal) as out:
        for entry in entries:
            outcome = done.get(entry.index)
            if outcome is None:
                outcome = place_entry(dest, entry, move=move)
                out.record(outcome)
            outcomes.append(outcome)
        if not move:
            os.sync()  # copies leave their sources: synced once, as the local engine does
    return outcomes


def place_entry(dest: Path, entry: PlanEntry, *, move: bool) -> Outcome:
    try:
        final = _place(dest / entry.folder, entry, move=move)
    except OSError as exc:
        if entry.readable:
            # Readable a moment ago (it vanished, or DEST is full): report it, keep going.
            return Outcome(entry.index, None, f"could not be placed: {exc}")
        log.warning("%s: left in place, could not be set aside: %s", entry.source, exc)
        return Outcome(entry.index, None)
    return Outcome(entry.index, final)


def _place(folder: Path, entry: PlanEntry, *, move: bool) -> str | None:
    if entry.slot < 1:
        return None  # an unreadable entry that was no regular file when planned: it stays
    if move:
        _name_the_source_again(entry)
    for name in itertools.islice(fsops.candidate_names(entry.name), entry.slot - 1, None):
        target = folder / name
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            break
        placed, second_name = _placed_before(entry, target, st)
        if placed:
            if move and second_name is not None:
                _finish_move(entry, target, second_name)
            return name
    else:
        raise FileExistsError(f"no free name for {entry.name} in {folder}")
    if not entry.readable and not entry.source.is_file():
        return None  # as the local engine: an unreadable non-file stays where it is
    place = fsops.place_move if move else functools.partial(fsops.place_copy, sync=False)
    return place(entry.source, folder, name, tag=f"{os.getpid()}-{entry.index}").name


def _name_the_source_again(entry: PlanEntry) -> None:
    """A move killed inside `fsops.remove_if_unchanged` leaves the source under its private
    name: give it its name back, so that the checks below tell the placed file's second name
    (then unlinked) from a file that had replaced the source (then left in SRC)."""
    hidden = fsops.hidden_name(entry.source)
    if os.path.lexists(hidden):
        fsops.give_back(hidden, entry.source)


def _placed_before(entry: PlanEntry, target: Path, st: os.stat_result
                   ) -> tuple[bool, os.stat_result | None]:
    """Whether `target` is this entry's file, placed by an attempt that died unjournaled;
    and the source's stat if the source's name still holds that file (a move to finish)."""
    if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (entry.size,
                                                                        entry.mtime_ns):
        return False, None
    try:
        src = os.lstat(entry.source)
    except FileNotFoundError:
        return True, None  # moved, or its source deleted since: the copy is all there is
    if os.path.samestat(src, st):
        return True, src  # linked, the source not yet unlinked
    if (src.st_size, src.st_mtime_ns) != (entry.size, entry.mtime_ns):
        # The source's name holds another file now (it replaced the planned one after the
        # placing began): the planned file can only be the one at `target`.
        return True, None
    same = _same_bytes(entry.source, target)
    return same, src if same else None


def _finish_move(entry: PlanEntry, target: Path, source: os.stat_result) -> None:
    """The file is at `target`; drop the source's name, which still holds it (the crash came
    between placing and unlinking)."""
    fsops.fsync_dir(target.parent)
    fsops.remove_if_unchanged(entry.source, source)


def _same_bytes(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(_COMPARE_BLOCK), fb.read(_COMPARE_BLOCK)
            if x != y:
                return False
            if not x:
                return True


def slices(entries: Sequence[PlanEntry], size: int) -> Iterator[Sequence[PlanEntry]]:
    for lo in range(0, len(entries), size):
        yield entries[lo:lo + size]


# ---- the manifest


def write_manifest(dest: Path, entries: Sequence[PlanEntry],
                   outcomes: dict[int, Outcome]) -> Manifest:
    """manifest.csv (and _unreadable/reasons.csv) as the local engine writes them: placed
    files in listing order, then the unreadable, then those that could not be placed."""
    result = Manifest()
    rows: list[list[object]] = []
    failed: list[tuple[PlanEntry, str]] = []
    bad: list[tuple[PlanEntry, ImageError, str]] = []
    heaps: dict[str, list[tuple[float, int, Path]]] = {}
    for e in entries:
        outcome = outcomes[e.index]
        if not e.readable:
            bad.append((e, image_error(e.source, e.kind, e.reason), outcome.final or ""))
        elif outcome.final is None:
            failed.append((e, outcome.error or "could not be placed"))
        else:
            final = dest / e.folder / outcome.final
            result.placed += 1
            rows.append([e.source, final, e.folder, f"{e.distance:.4f}", ""])
            keep = heaps.setdefault(e.folder, [])
            heapq.heappush(keep, (-e.distance, e.index, final))  # max-heap of the nearest
            if len(keep) > SAMPLES_PER_FOLDER:
                heapq.heappop(keep)
    bad.extend((e, ImageError(e.source, why), "") for e, why in failed)
    if bad:
        reasons: list[list[object]] = []
        for e, err, final_name in bad:
            where: Path | str = dest / UNREADABLE_FOLDER / final_name if final_name else ""
            reasons.append([e.source, where, err.kind, err.reason])
            rows.append([e.source, where, UNREADABLE_FOLDER, "", f"{err.kind}: {err.reason}"])
            result.unreadable.append((e.source, err))
        fsops.write_csv_new(dest / UNREADABLE_FOLDER, "reasons.csv", REASONS_HEADER, reasons)
    fsops.write_csv_new(dest, MANIFEST, MANIFEST_HEADER, rows)
    result.samples = {f: [p for _, _, p in sorted(h, reverse=True)] for f, h in heaps.items()}
    return result


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"
