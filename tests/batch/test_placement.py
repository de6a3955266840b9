"""Retry-safe placement: names decided up front, a crash anywhere, a retry, nothing twice.

Real files in tmp_path, segd's real no-clobber link/copy. A crash is a BaseException raised
at the named point (after the link, before its journal line; after a move's link, before
the source is unlinked): it leaves on disk exactly what a killed worker leaves, since the
journal is flushed line by line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from segd.batch import placement
from segd.batch.placement import Journal, Outcome, PlanEntry
from segd.core.library import UNREADABLE_FOLDER
from segd.state import fsops


class Killed(BaseException):
    """The worker dies here."""


def make_sources(root: Path, count: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = root / f"img_{i:02d}.jpg"
        p.write_bytes(f"photo {i}\n".encode() * (i + 1))
        os.utime(p, ns=(1_600_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
        paths.append(p)
    return paths


def plan_for(dest: Path, sources: list[Path], folder_of: Callable[[int], str] = lambda i:
             f"cluster-0{i % 2 + 1}") -> list[PlanEntry]:
    wanted = [(folder_of(i), p.name) for i, p in enumerate(sources)]
    slots = placement.decide_slots(dest, wanted)
    return [PlanEntry(i, p, p.stat().st_size, p.stat().st_mtime_ns, folder, p.name, slot,
                      cluster=int(folder[-1]) - 1, distance=0.1 * i)
            for i, (p, (folder, _), slot) in enumerate(zip(sources, wanted, slots, strict=True))]


def files_under(dest: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def crash_on_call(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, call: int,
                  *, after: bool) -> None:
    """Make `module.name` raise Killed on its `call`-th call, before or after doing its work."""
    real = getattr(module, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call and not after:
            raise Killed
        result = real(*args, **kwargs)
        if calls[0] == call:
            raise Killed
        return result

    monkeypatch.setattr(module, name, wrapper)


def test_names_are_decided_past_what_dest_holds_and_past_each_other(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "cluster-01").mkdir(parents=True)
    (dest / "cluster-01" / "a.jpg").write_bytes(b"already here")
    wanted = [("cluster-01", "a.jpg"), ("cluster-01", "a.jpg"), ("cluster-02", "a.jpg"),
              ("cluster-01", "b.jpg"), ("cluster-01", "b.jpg")]
    slots = placement.decide_slots(dest, wanted)
    assert slots == [2, 3, 1, 1, 2]
    assert [placement.candidate(n, s) for (_, n), s in zip(wanted, slots, strict=True)] == [
        "a (2).jpg", "a (3).jpg", "a.jpg", "b.jpg", "b (2).jpg"]


def test_the_plan_survives_its_file(tmp_path: Path) -> None:
    odd = tmp_path / os.fsdecode(b"caf\xe9, \"quoted\"\nline.jpg")
    plan = [PlanEntry(0, odd, 5, 7, "cluster-01", odd.name, 2, 0, 0.123456789),
            PlanEntry(1, tmp_path / "x.jpg", 0, 1, UNREADABLE_FOLDER, "x.jpg", 1,
                      kind="empty", reason="file is empty (0 bytes)")]
    placement.write_plan(tmp_path / "plan.csv", plan)
    back = placement.read_plan(tmp_path / "plan.csv")
    assert back[0] == plan[0]
    assert math.isnan(back[1].distance) and back[1].reason == plan[1].reason
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(fsops.TMP_PREFIX)]


def test_a_torn_journal_line_is_ignored_and_not_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "placed.jsonl"
    path.write_bytes(b'[0, "a.jpg", null]\n[1, "b.j')  # killed mid-line
    with Journal(path) as journal:
        journal.record(Outcome(2, "c.jpg"))
    assert placement.read_journal(path) == {0: Outcome(0, "a.jpg"), 2: Outcome(2, "c.jpg")}


@pytest.mark.parametrize("call", [1, 4, 6])
def test_a_crash_between_link_and_journal_then_a_retry_places_each_file_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    dest = tmp_path / "dest"
    sources = make_sources(tmp_path / "src", 6)
    plan = plan_for(dest, sources)
    journal = tmp_path / "placed.jsonl"
    crash_on_call(monkeypatch, fsops, "place_copy", call, after=True)
    with pytest.raises(Killed):
        placement.place_slice(dest, plan, journal, move=False)
    monkeypatch.undo()
    assert len(placement.read_journal(journal)) == call - 1  # the last link is unjournaled
    before = {p: os.stat(dest / p).st_ino for p in files_under(dest)}

    outcomes = placement.place_slice(dest, plan, journal, move=False)
    assert [o.final for o in outcomes] == [p.name for p in sources]
    expected = {f"{e.folder}/{e.name}": e.source.read_bytes() for e in plan}
    assert files_under(dest) == expected  # every file once, no "(2)" copy
    # Nothing placed before the crash was replaced.
    assert all(os.stat(dest / p).st_ino == ino for p, ino in before.items())
    assert all(p.exists() for p in sources)


def test_a_move_killed_between_link_and_unlink_finishes_on_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "dest"
    sources = make_sources(tmp_path / "src", 4)
    contents = {p.name: p.read_bytes() for p in sources}
    plan = plan_for(dest, sources)
    journal = tmp_path / "placed.jsonl"
    crash_on_call(monkeypatch, fsops, "remove_if_unchanged", 3, after=False)
    with pytest.raises(Killed):
        placement.place_slice(dest, plan, journal, move=True)
    monkeypatch.undo()
    linked = dest / plan[2].folder / plan[2].name
    assert sources[2].exists() and os.path.samefile(sources[2], linked)  # two names, one file

    outcomes = placement.place_slice(dest, plan, journal, move=True)
    assert [o.final for o in outcomes] == [p.name for p in sources]
    assert not any(p.exists() for p in sources)
    assert files_under(dest) == {f"{e.folder}/{e.name}": contents[e.name] for e in plan}


def kill_after_the_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int,
                        victim: int) -> tuple[Path, list[Path], list[PlanEntry], Path]:
    """A move of `count` files killed after file `victim` was linked into DEST, before its
    source's name was taken away."""
    dest = tmp_path / "dest"
    sources = make_sources(tmp_path / "src", count)
    plan = plan_for(dest, sources)
    journal = tmp_path / "placed.jsonl"
    crash_on_call(monkeypatch, fsops, "remove_if_unchanged", victim + 1, after=False)
    with pytest.raises(Killed):
        placement.place_slice(dest, plan, journal, move=True)
    monkeypatch.undo()
    return dest, sources, plan, journal


def test_a_move_killed_with_the_source_under_its_private_name_finishes_on_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest, sources, plan, journal = kill_after_the_link(tmp_path, monkeypatch, 4, 2)
    contents = {p.name: p.read_bytes() for p in sources[2:]}
    contents.update({e.name: (dest / e.folder / e.name).read_bytes() for e in plan[:2]})
    # What a kill inside remove_if_unchanged leaves: the name taken away, not yet unlinked.
    os.rename(sources[2], fsops.hidden_name(sources[2]))

    outcomes = placement.place_slice(dest, plan, journal, move=True)
    assert [o.final for o in outcomes] == [p.name for p in sources]
    assert sorted((tmp_path / "src").iterdir()) == []  # no private name left behind
    assert files_under(dest) == {f"{e.folder}/{e.name}": contents[e.name] for e in plan}


def test_a_file_that_replaced_the_source_before_the_kill_gets_its_name_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest, sources, plan, journal = kill_after_the_link(tmp_path, monkeypatch, 4, 2)
    planned = sources[2].read_bytes()
    # A newer photo renamed over the source between the check and the private rename,
    # then the kill: the private name holds the newer photo.
    newer = tmp_path / "newer.jpg"
    newer.write_bytes(b"a newer photo, same name")
    os.rename(newer, sources[2])
    os.rename(sources[2], fsops.hidden_name(sources[2]))

    outcomes = placement.place_slice(dest, plan, journal, move=True)
    assert [o.final for o in outcomes] == [p.name for p in sources]
    assert (dest / plan[2].folder / plan[2].name).read_bytes() == planned
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == [sources[2].name]
    assert sources[2].read_bytes() == b"a newer photo, same name"  # kept, where it was


def test_a_file_dropped_at_a_planned_name_is_kept_and_a_retry_still_places_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "dest"
    sources = make_sources(tmp_path / "src", 3)
    plan = plan_for(dest, sources, folder_of=lambda i: "cluster-01")
    (dest / "cluster-01").mkdir(parents=True)
    squatter = dest / "cluster-01" / sources[1].name
    squatter.write_bytes(b"someone else's file, created after the plan")
    journal = tmp_path / "placed.jsonl"
    crash_on_call(monkeypatch, fsops, "place_copy", 2, after=True)
    with pytest.raises(Killed):
        placement.place_slice(dest, plan, journal, move=False)
    monkeypatch.undo()
    outcomes = placement.place_slice(dest, plan, journal, move=False)
    assert outcomes[1].final == "img_01 (2).jpg"
    assert squatter.read_bytes() == b"someone else's file, created after the plan"
    assert sorted(files_under(dest)) == ["cluster-01/img_00.jpg", "cluster-01/img_01 (2).jpg",
                                         "cluster-01/img_01.jpg", "cluster-01/img_02.jpg"]


def test_a_vanished_source_is_reported_not_fatal(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    sources = make_sources(tmp_path / "src", 3)
    plan = plan_for(dest, sources)
    sources[1].unlink()
    outcomes = placement.place_slice(dest, plan, tmp_path / "placed.jsonl", move=False)
    assert outcomes[1].final is None and "could not be placed" in (outcomes[1].error or "")
    assert outcomes[0].final and outcomes[2].final
    manifest = placement.write_manifest(dest, plan, {o.index: o for o in outcomes})
    assert manifest.placed == 2 and [p for p, _ in manifest.unreadable] == [sources[1]]
    assert (dest / "manifest.csv").is_file()
    assert (dest / UNREADABLE_FOLDER / "reasons.csv").is_file()


def test_an_unreadable_non_file_stays_where_it_is_and_is_reported(tmp_path: Path) -> None:
    """As the local engine: a dangling link or a FIFO is listed, unreadable, and left in
    place; the manifest and reasons.csv name it with no destination."""
    dest = tmp_path / "dest"
    sources = make_sources(tmp_path / "src", 2)
    dangling = tmp_path / "src" / "gone.jpg"
    dangling.symlink_to(tmp_path / "nowhere.jpg")
    fifo = tmp_path / "src" / "pipe.jpg"
    os.mkfifo(fifo)
    plan = plan_for(dest, sources)
    for path in (dangling, fifo):  # the slot the Ray engine gives a non-file: 0, no name
        plan.append(PlanEntry(len(plan), path, -1, -1, UNREADABLE_FOLDER, path.name, 0,
                              kind="inaccessible", reason="not a regular file"))
    outcomes = placement.place_slice(dest, plan, tmp_path / "placed.jsonl", move=True)
    assert [o.final for o in outcomes[2:]] == [None, None]
    assert dangling.is_symlink() and fifo.exists()
    manifest = placement.write_manifest(dest, plan, {o.index: o for o in outcomes})
    assert manifest.placed == 2 and [p for p, _ in manifest.unreadable] == [dangling, fifo]
    rows = (dest / UNREADABLE_FOLDER / "reasons.csv").read_text().splitlines()
    assert rows[1:] == [f"{dangling},,inaccessible,not a regular file",
                        f"{fifo},,inaccessible,not a regular file"]
    assert not any((dest / UNREADABLE_FOLDER).glob("*.jpg"))
