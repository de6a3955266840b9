"""The readiness rules on a fake clock and a fake stat: every rule, no sleeps, no files."""

from __future__ import annotations

from pathlib import Path

import pytest

from segd.core.readiness import Mode, Readiness, Signature

QUIET = 2.0
S = 1_000_000_000  # ns per second
INBOX = Path("/inbox")


class World:
    """A fake clock (monotonic and wall) and a fake file system of signatures."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall_ns = 1_700_000_000 * S
        self.files: dict[Path, Signature] = {}

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_ns += int(seconds * S)

    def write(self, name: str, *, size: int = 10, age: float = 0.0, inode: int = 1) -> Path:
        """Create or rewrite a file whose mtime is `age` seconds before now."""
        path = INBOX / name
        self.files[path] = Signature(size, self.wall_ns - int(age * S), inode)
        return path

    def stat(self, path: Path) -> Signature | None:
        return self.files.get(path)

    def entries(self, *paths: Path) -> list[tuple[Path, Signature]]:
        return [(p, self.files[p]) for p in paths]

    def readiness(self, mode: Mode = "inotify") -> Readiness:
        return Readiness(
            mode=mode, quiet_s=QUIET, monotonic=lambda: self.mono, wall_ns=lambda: self.wall_ns
        )


@pytest.fixture
def world() -> World:
    return World()


# -- inotify mode: events ---------------------------------------------------------------------


def test_close_and_move_in_deliver_at_once(world: World) -> None:
    r = world.readiness()
    assert r.closed(INBOX / "a.jpg") == [INBOX / "a.jpg"]
    assert r.moved_in(INBOX / "b.jpg") == [INBOX / "b.jpg"]
    assert r.waiting == frozenset()


def test_write_activity_alone_delivers_nothing(world: World) -> None:
    r = world.readiness()
    path = world.write("slow.jpg")
    assert r.written(path) == []
    world.advance(QUIET * 10)
    assert r.check_quiet(world.stat) == []  # no quiet-period logic for a file seen created
    assert r.closed(path) == [path]


def test_symlink_is_complete_when_created(world: World) -> None:
    r = world.readiness()
    assert r.written(INBOX / "link.jpg", symlink=True) == [INBOX / "link.jpg"]


# -- inotify mode: scanned files ------------------------------------------------------------


def test_scanned_file_old_enough_is_delivered_at_once(world: World) -> None:
    r = world.readiness()
    old = world.write("old.jpg", age=QUIET)  # exactly quiet_s old counts as old
    young = world.write("young.jpg", age=QUIET - 0.001)
    assert r.scanned(world.entries(old, young)) == [old]
    assert r.waiting == {young}


def test_young_scanned_file_waits_out_the_quiet_period(world: World) -> None:
    r = world.readiness()
    young = world.write("young.jpg", age=0.5)  # closed before the watch started: no event
    assert r.scanned(world.entries(young)) == []
    world.advance(QUIET - 0.01)
    assert r.check_quiet(world.stat) == []
    world.advance(0.01)
    assert r.check_quiet(world.stat) == [young]
    assert r.waiting == frozenset()
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == []  # delivered once


def test_future_mtime_counts_as_recent(world: World) -> None:
    # Clock skew (a camera, a share): an mtime an hour ahead is not "old", however the
    # subtraction comes out; the quiet period decides.
    r = world.readiness()
    skewed = world.write("skewed.jpg", age=-3600)
    assert r.scanned(world.entries(skewed)) == []
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == [skewed]


def test_write_activity_cancels_the_fallback_and_close_delivers(world: World) -> None:
    # A writer that started before the watch, seen writing after it: only its close counts,
    # even when it then pauses for longer than quiet_s.
    r = world.readiness()
    copying = world.write("copying.jpg", age=0.1)
    assert r.scanned(world.entries(copying)) == []
    world.advance(0.5)
    assert r.written(copying) == []
    assert r.waiting == frozenset()
    world.advance(QUIET * 3)
    assert r.check_quiet(world.stat) == []
    assert r.closed(copying) == [copying]


def test_close_of_a_waiting_file_ends_its_wait(world: World) -> None:
    r = world.readiness()
    young = world.write("young.jpg")
    r.scanned(world.entries(young))
    assert r.closed(young) == [young]
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == []


def test_every_rescan_redelivers_what_is_still_there(world: World) -> None:
    r = world.readiness()
    old = world.write("held_back.jpg", age=60)
    assert r.scanned(world.entries(old)) == [old]
    assert r.scanned(world.entries(old)) == [old]


# -- the quiet period ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change", [{"size": 20}, {"age": 1.0}, {"inode": 2}], ids=["size", "mtime", "inode"]
)
def test_signature_change_restarts_the_quiet_period(world: World, change: dict) -> None:
    r = world.readiness()
    path = world.write("a.jpg")
    r.scanned(world.entries(path))
    world.advance(QUIET * 0.75)
    world.write("a.jpg", **{"size": 10, "age": 0.0, "inode": 1, **change})
    assert r.check_quiet(world.stat) == []  # changed: the period starts again now
    world.advance(QUIET * 0.75)
    assert r.check_quiet(world.stat) == []  # 1.5 quiet_s after the scan, 0.75 after the change
    world.advance(QUIET * 0.25)
    assert r.check_quiet(world.stat) == [path]


def test_repeated_hints_do_not_restart_the_period(world: World) -> None:
    r = world.readiness("polling")
    path = world.write("a.jpg")
    r.written(path)
    r.check_quiet(world.stat)  # first stat: the period starts
    world.advance(QUIET / 2)
    r.written(path)  # a hint for an unchanged file
    world.advance(QUIET / 2)
    assert r.check_quiet(world.stat) == [path]


def test_file_deleted_while_waiting_is_forgotten(world: World) -> None:
    r = world.readiness()
    a, b = world.write("a.jpg"), world.write("b.jpg")
    r.scanned(world.entries(a, b))
    r.deleted(a)  # the event
    del world.files[b]  # no event: the stat says it is gone
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == []
    assert r.waiting == frozenset()


def test_check_ignores_a_file_tracked_anew_during_its_stats(world: World) -> None:
    # Between begin_check and finish_check (the stats run without the caller's lock) the
    # file was replaced: the stat found it gone, then the new one was seen. The stale "gone"
    # must not drop the new file's wait, or nothing would ever deliver it.
    r = world.readiness()
    path = world.write("a.jpg")
    r.scanned(world.entries(path))
    check = r.begin_check()
    del world.files[path]
    observed = {p: world.stat(p) for p in check.paths}
    assert observed == {path: None}
    r.deleted(path)
    world.write("a.jpg", inode=2)
    r.scanned(world.entries(path))
    assert r.finish_check(check, observed) == []
    assert r.waiting == {path}
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == [path]


def test_check_counts_conservatively_around_slow_stats(world: World) -> None:
    r = world.readiness("polling")
    path = world.write("a.jpg")
    r.written(path)
    check = r.begin_check()
    world.advance(1.0)  # the stats took a second (a slow share)
    r.finish_check(check, {path: world.stat(path)})  # first observation: stable from now on
    world.advance(QUIET - 0.5)  # quiet_s after begin_check, but not after the stats ended
    assert r.check_quiet(world.stat) == []
    world.advance(0.5)
    assert r.check_quiet(world.stat) == [path]


def test_finish_check_skips_paths_it_was_not_given(world: World) -> None:
    r = world.readiness()
    path = world.write("a.jpg")
    r.scanned(world.entries(path))
    world.advance(QUIET)
    assert r.finish_check(r.begin_check(), {}) == []
    assert r.waiting == {path}


# -- polling mode ----------------------------------------------------------------------------


def test_polling_events_are_hints(world: World) -> None:
    r = world.readiness("polling")
    grown = world.write("grown.jpg")
    closed = world.write("closed.jpg")
    moved = world.write("moved.jpg")
    link = world.write("link.jpg")
    assert r.written(grown) == []
    assert r.closed(closed) == []
    assert r.moved_in(moved) == []
    assert r.written(link, symlink=True) == []
    assert r.waiting == {grown, closed, moved, link}
    # An event carries no signature: the first check stats it, and the period starts there.
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == []
    world.advance(QUIET)
    assert sorted(r.check_quiet(world.stat)) == sorted([grown, closed, moved, link])


def test_polling_growing_file_waits_until_it_stops(world: World) -> None:
    r = world.readiness("polling")
    path = world.write("grow.jpg", size=1)
    r.written(path)
    for size in range(2, 10):
        assert r.check_quiet(world.stat) == []
        world.advance(QUIET / 2)
        world.write("grow.jpg", size=size)
    assert r.check_quiet(world.stat) == []
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == [path]


def test_polling_scanned_files_wait_whatever_their_age(world: World) -> None:
    r = world.readiness("polling")
    old = world.write("old.jpg", age=3600)
    assert r.scanned(world.entries(old)) == []
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == [old]


def test_polling_move_forgets_the_source_and_waits_for_the_destination(world: World) -> None:
    r = world.readiness("polling")
    part = world.write("x.jpg.part")
    r.written(part)
    final = INBOX / "x.jpg"
    world.files[final] = world.files.pop(part)
    r.deleted(part)
    r.moved_in(final)
    assert r.waiting == {final}


def test_reset_forgets_everything_and_can_switch_mode(world: World) -> None:
    r = world.readiness()
    young = world.write("young.jpg")
    r.scanned(world.entries(young))
    r.poll_folder(INBOX / "deep")
    r.reset("polling")
    assert r.mode == "polling"
    assert r.waiting == frozenset()
    assert r.polled_folders == frozenset()
    assert r.closed(young) == []  # now a hint


# -- polled folders (no inotify watch left) --------------------------------------------------


def test_polled_folders_collapse_to_the_topmost(world: World) -> None:
    r = world.readiness()
    assert r.poll_folder(INBOX / "a" / "b")
    assert r.poll_folder(INBOX / "c")
    assert not r.poll_folder(INBOX / "a" / "b" / "c")  # already covered
    assert r.poll_folder(INBOX / "a")  # covers a/b
    assert r.polled_folders == {INBOX / "a", INBOX / "c"}
    assert r.is_polled(INBOX / "a" / "b" / "x.jpg")
    assert not r.is_polled(INBOX / "ab" / "x.jpg")
    assert not r.is_polled(INBOX / "x.jpg")


def test_files_in_polled_folders_follow_the_polling_rules(world: World) -> None:
    r = world.readiness()
    r.poll_folder(INBOX / "deep")
    old_deep = world.write("deep/old.jpg", age=3600)
    old_top = world.write("old.jpg", age=3600)
    # A watched file that old is ready at once; a polled one still waits: nothing would
    # have told us about a writer in that folder.
    assert r.scanned(world.entries(old_deep, old_top)) == [old_top]
    assert r.waiting == {old_deep}
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == [old_deep]


def test_polled_listing_reports_new_and_changed_files_once(world: World) -> None:
    r = world.readiness()
    folder = INBOX / "deep"
    r.poll_folder(folder)
    a = world.write("deep/a.jpg")
    r.polled(folder, world.entries(a))
    assert r.waiting == {a}
    world.advance(QUIET)
    r.polled(folder, world.entries(a))  # still waiting: listed again, nothing changes
    assert r.check_quiet(world.stat) == [a]
    # Ready once; listing it again unchanged is no news.
    world.advance(QUIET)
    r.polled(folder, world.entries(a))
    assert r.waiting == frozenset()
    # Rewritten in place: new again.
    world.write("deep/a.jpg", size=99)
    r.polled(folder, world.entries(a))
    assert r.waiting == {a}
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == [a]


def test_polled_file_that_left_and_came_back_is_new(world: World) -> None:
    r = world.readiness()
    folder = INBOX / "deep"
    r.poll_folder(folder)
    a = world.write("deep/a.jpg")
    r.polled(folder, world.entries(a))
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == [a]
    r.polled(folder, [])  # filed by the daemon: gone from the listing
    r.polled(folder, world.entries(a))  # the same bytes dropped again
    assert r.waiting == {a}


def test_deleted_polled_file_is_new_when_it_returns(world: World) -> None:
    r = world.readiness()
    folder = INBOX / "deep"
    r.poll_folder(folder)
    a = world.write("deep/a.jpg")
    r.polled(folder, world.entries(a))
    world.advance(QUIET)
    r.check_quiet(world.stat)
    r.deleted(a)
    r.polled(folder, world.entries(a))
    assert r.waiting == {a}


def test_subsumed_folder_keeps_what_was_ready(world: World) -> None:
    r = world.readiness()
    inner = INBOX / "a" / "b"
    r.poll_folder(inner)
    f = world.write("a/b/f.jpg")
    r.polled(inner, world.entries(f))
    world.advance(QUIET)
    assert r.check_quiet(world.stat) == [f]
    r.poll_folder(INBOX / "a")
    r.polled(INBOX / "a", world.entries(f))
    assert r.waiting == frozenset()


def test_listing_of_a_folder_no_longer_polled_is_ignored(world: World) -> None:
    r = world.readiness()
    folder = INBOX / "deep"
    r.poll_folder(folder)
    r.unpoll_folder(folder)
    a = world.write("deep/a.jpg")
    r.polled(folder, world.entries(a))
    assert r.waiting == frozenset()
    assert r.polled_folders == frozenset()


def test_kernel_events_in_a_polled_folder_still_count(world: World) -> None:
    # A folder below a polled one may still have its watch; its close is as good as ever.
    r = world.readiness()
    r.poll_folder(INBOX / "deep")
    path = world.write("deep/sub/a.jpg")
    assert r.closed(path) == [path]
