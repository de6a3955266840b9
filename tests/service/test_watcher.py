"""The inbox watcher against a real observer on a real folder.

The readiness rules themselves are tested on a fake clock in tests/core/test_readiness.py;
these tests check the plumbing: real inotify and polling observers, real files, threads.
Every wait is on a condition with a generous deadline; every "not delivered" check is made
against a later sentinel event or after a margin well above the configured periods; and no
assertion needs the machine to be fast. The inotify watch limit is simulated by making
watchdog's inotify_add_watch fail with ENOSPC, as the kernel does, and tested for real in
a user namespace where the limit can be lowered.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from segd.config import WatchConfig
from segd.service.inbox_scan import is_ignored, scan_inbox
from segd.service.watcher import InboxWatcher

LINUX = sys.platform.startswith("linux")
needs_inotify = pytest.mark.skipif(not LINUX, reason="inotify is Linux-only")

# Periodic rescans are off unless a test is about them: they re-deliver on purpose and
# would blur the "delivered once" checks.
BASE = WatchConfig(rescan_interval_s=0.0, quiet_s=0.5, poll_interval_s=0.2)
POLLING = dataclasses.replace(BASE, polling=True)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.02)


class Collector:
    """A thread-safe on_ready that records (monotonic time, path) and can be waited on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.calls: list[tuple[float, Path]] = []
        self.wall_ns: dict[Path, int] = {}  # wall clock of each path's first delivery

    def __call__(self, path: Path) -> None:
        with self._cond:
            self.calls.append((time.monotonic(), path))
            self.wall_ns.setdefault(path, time.time_ns())
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return [p.name for _, p in self.calls]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def time_of(self, name: str) -> float:
        with self._cond:
            return next(t for t, p in self.calls if p.name == name)

    def wait_for(self, *names: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(n in {p.name for _, p in self.calls} for n in names):
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [p.name for _, p in self.calls]
                    raise AssertionError(f"waited {timeout} s for {names}, got {got}")
                self._cond.wait(left)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def make_watcher(inbox: Path) -> Iterator[Callable[..., tuple[InboxWatcher, Collector]]]:
    started: list[InboxWatcher] = []

    def make(cfg: WatchConfig = BASE, *, start: bool = True) -> tuple[InboxWatcher, Collector]:
        collector = Collector()
        watcher = InboxWatcher(inbox, cfg, collector)
        started.append(watcher)
        if start:
            watcher.start()
        return watcher, collector

    yield make
    for watcher in started:
        watcher.stop()


def age(path: Path, seconds: float, *, now: float | None = None) -> None:
    """Backdate a file's mtime, as if it had been written long ago."""
    then = (time.time() if now is None else now) - seconds
    os.utime(path, (then, then))


def write_slowly(path: Path, chunks: int = 5, pause: float = 0.2) -> None:
    with open(path, "wb") as f:
        for _ in range(chunks):
            f.write(b"x" * 4096)
            f.flush()
            time.sleep(pause)


# -- pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".hidden.jpg", True),
        ("foo.jpg.part", True),
        ("foo.jpg.crdownload", True),
        ("FOO.JPG.TMP", True),
        ("foo.jpg~", True),
        ("~$foo.jpg", True),
        ("foo.jpg", False),
        ("part.jpg", False),
        ("IMG_0001.HEIC", False),
    ],
)
def test_is_ignored(name: str, ignored: bool) -> None:
    assert is_ignored(name, WatchConfig().ignore) is ignored


def test_scan_inbox_filters_and_orders(inbox: Path) -> None:
    now = time.time()
    for name, seconds in [("new.jpg", 10), ("old.jpg", 100), ("b.jpg", 50), ("a.jpg", 50)]:
        (inbox / name).write_bytes(b"x")
        age(inbox / name, seconds, now=now)  # a.jpg and b.jpg tie: the name decides
    (inbox / "x.jpg.part").write_bytes(b"x")
    (inbox / ".hidden.jpg").write_bytes(b"x")
    os.mkfifo(inbox / "fifo.jpg")  # opening it would block the daemon
    (inbox / "sub").mkdir()
    (inbox / "sub" / "deep.jpg").write_bytes(b"x")
    (inbox / ".thumbnails").mkdir()
    (inbox / ".thumbnails" / "t.jpg").write_bytes(b"x")
    outside = inbox.parent / "outside"
    outside.mkdir()
    (outside / "far.jpg").write_bytes(b"x")
    (inbox / "linkdir").symlink_to(outside, target_is_directory=True)
    (inbox / "link.jpg").symlink_to(outside / "far.jpg")
    age(inbox / "sub" / "deep.jpg", 1000)

    ignore = WatchConfig().ignore
    flat = [
        p.relative_to(inbox).as_posix() for p in scan_inbox(inbox, recursive=False, patterns=ignore)
    ]
    # Symlinks are delivered (the daemon quarantines them) but never followed.
    assert flat[:4] == ["old.jpg", "a.jpg", "b.jpg", "new.jpg"]
    assert sorted(flat[4:]) == ["link.jpg", "linkdir"]
    deep = [
        p.relative_to(inbox).as_posix() for p in scan_inbox(inbox, recursive=True, patterns=ignore)
    ]
    assert deep[0] == "sub/deep.jpg"
    assert sorted(deep) == sorted([*flat, "sub/deep.jpg"])


# -- inotify mode ------------------------------------------------------------------------


@needs_inotify
def test_copy_delivered_once_and_reading_it_triggers_nothing(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path, tmp_path: Path
) -> None:
    watcher, got = make_watcher()
    assert watcher.mode == "inotify"
    src = tmp_path / "src.jpg"
    src.write_bytes(os.urandom(200_000))
    shutil.copy(src, inbox / "a.jpg")
    got.wait_for("a.jpg")
    # The daemon reads the file: a read-only close must not come back as a delivery.
    (inbox / "a.jpg").read_bytes()
    # And moving it out of the inbox is no delivery either.
    (inbox / "a.jpg").rename(tmp_path / "sorted.jpg")
    shutil.copy(src, inbox / "sentinel.jpg")
    got.wait_for("sentinel.jpg")
    time.sleep(0.7)  # past the move grouper's 0.5 s hold on an unpaired move-out
    assert got.names() == ["a.jpg", "sentinel.jpg"]


@needs_inotify
def test_slow_write_delivered_only_after_close(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path
) -> None:
    # quiet_s well below the pauses: no quiet-period logic may fire for a file we saw created.
    _, got = make_watcher(dataclasses.replace(BASE, quiet_s=0.1))
    target = inbox / "slow.jpg"
    with open(target, "wb") as f:
        for _ in range(5):
            f.write(b"x" * 4096)
            f.flush()
            time.sleep(0.2)
            assert got.names() == []
        closed_at = time.monotonic()
    got.wait_for("slow.jpg")
    assert got.time_of("slow.jpg") >= closed_at
    assert got.names() == ["slow.jpg"]


@needs_inotify
def test_part_file_delivered_under_final_name_only(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path
) -> None:
    _, got = make_watcher()
    write_slowly(inbox / "x.jpg.part", chunks=2, pause=0.1)
    time.sleep(0.2)
    assert got.names() == []
    (inbox / "x.jpg.part").rename(inbox / "x.jpg")
    got.wait_for("x.jpg")
    time.sleep(0.3)
    assert got.names() == ["x.jpg"]


@needs_inotify
def test_move_in_from_outside_delivered(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path, tmp_path: Path
) -> None:
    _, got = make_watcher()
    (tmp_path / "done.jpg").write_bytes(b"x" * 1000)
    (tmp_path / "done.jpg").rename(inbox / "moved.jpg")
    got.wait_for("moved.jpg")
    assert got.names() == ["moved.jpg"]


@needs_inotify
def test_dotfile_ignored(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path
) -> None:
    _, got = make_watcher()
    (inbox / ".hidden.jpg").write_bytes(b"x")
    (inbox / "foo.crdownload").write_bytes(b"x")
    (inbox / "visible.jpg").write_bytes(b"x")
    got.wait_for("visible.jpg")
    time.sleep(0.2)
    assert got.names() == ["visible.jpg"]


@needs_inotify
def test_startup_scan_old_files_at_once_recent_after_quiet(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path
) -> None:
    # The age boundary itself is tested on a fake clock; here the recent file's mtime is
    # put in the future, so that it counts as recent however long the start takes.
    (inbox / "old.jpg").write_bytes(b"x")
    age(inbox / "old.jpg", 60)
    (inbox / "recent.jpg").write_bytes(b"x")  # closed before we watched: no event will come
    age(inbox / "recent.jpg", -3600)
    (inbox / ".tmpfile").write_bytes(b"x")
    started = time.monotonic()
    watcher, got = make_watcher()
    assert got.names() == ["old.jpg"]  # delivered synchronously by start()
    assert watcher.waiting == {inbox / "recent.jpg"}
    got.wait_for("recent.jpg")  # by the quiet period: nothing else would deliver it
    assert got.time_of("recent.jpg") - started >= BASE.quiet_s
    assert watcher.waiting == frozenset()
    (inbox / "sentinel.jpg").write_bytes(b"x")
    got.wait_for("sentinel.jpg")
    assert got.names() == ["old.jpg", "recent.jpg", "sentinel.jpg"]


@needs_inotify
def test_startup_scan_waits_for_a_writer_that_started_before_us(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path
) -> None:
    # A long quiet period: the scan must see the file as recent, and the fallback must not
    # fire before the writer's next write arrives, however slow the machine.
    target = inbox / "copying.jpg"
    with open(target, "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        watcher, got = make_watcher(dataclasses.replace(BASE, quiet_s=30.0))
        assert watcher.waiting == {target}  # the scan's quiet-period fallback
        f.write(b"x" * 4096)
        f.flush()
        # Seen writing: the fallback is cancelled, only the close can deliver it now.
        wait_until(lambda: target not in watcher.waiting, "the write to cancel the fallback")
        assert got.names() == []
        closed_at = time.monotonic()
    got.wait_for("copying.jpg")
    assert got.time_of("copying.jpg") >= closed_at
    assert got.names() == ["copying.jpg"]


@needs_inotify
@pytest.mark.parametrize("recursive", [False, True])
def test_subfolders(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path, recursive: bool
) -> None:
    sub = inbox / "sub"
    sub.mkdir()
    _, got = make_watcher(dataclasses.replace(BASE, recursive=recursive))
    (sub / "deep.jpg").write_bytes(b"x")
    (inbox / "top.jpg").write_bytes(b"x")
    got.wait_for("top.jpg")
    if recursive:
        got.wait_for("deep.jpg")
        assert [p for _, p in got.calls if p.name == "deep.jpg"] == [sub / "deep.jpg"]
    else:
        time.sleep(0.3)
        assert got.names() == ["top.jpg"]


@needs_inotify
def test_recursive_folder_copied_in_and_symlinked_folder_not_followed(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "album"
    outside.mkdir()
    for i in range(5):
        (outside / f"p{i}.jpg").write_bytes(b"x" * 1000)
        age(outside / f"p{i}.jpg", 60)
    _, got = make_watcher(dataclasses.replace(BASE, recursive=True))
    (inbox / "linked").symlink_to(outside, target_is_directory=True)
    # Files written inside a brand-new folder before its watch exists (cp -r) and files in
    # a folder moved in wholesale have no close event of their own.
    shutil.copytree(outside, inbox / "copied")
    moved = tmp_path / "moved_album"
    shutil.copytree(outside, moved)
    moved.rename(inbox / "moved")
    names = [f"p{i}.jpg" for i in range(5)]
    got.wait_for("linked", *names)
    time.sleep(0.3)
    with got._cond:
        paths = {p.relative_to(inbox).as_posix() for _, p in got.calls}
    assert paths == {"linked"} | {f"{d}/{n}" for d in ("copied", "moved") for n in names}


@needs_inotify
def test_symlink_and_hardlink(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path, tmp_path: Path
) -> None:
    watcher, got = make_watcher()
    target = tmp_path / "t.jpg"
    target.write_bytes(b"x")
    age(target, 60)
    (inbox / "sym.jpg").symlink_to(target)  # complete on creation: delivered from the event
    got.wait_for("sym.jpg")
    os.link(target, inbox / "hard.jpg")  # a hard link fires only IN_CREATE: no event delivery
    time.sleep(0.3)
    assert got.names() == ["sym.jpg"]
    watcher.rescan()  # what the periodic rescan would do
    got.wait_for("hard.jpg", timeout=0.1)


@needs_inotify
def test_periodic_rescan_catches_missed_files(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path, tmp_path: Path
) -> None:
    watcher, got = make_watcher(dataclasses.replace(BASE, rescan_interval_s=0.3))
    watcher.stop()
    (inbox / "while_stopped.jpg").write_bytes(b"x")
    age(inbox / "while_stopped.jpg", 60)
    os.link(inbox / "while_stopped.jpg", tmp_path / "other")
    watcher.start()  # start-up scan
    got.wait_for("while_stopped.jpg", timeout=0.1)
    os.link(tmp_path / "other", inbox / "linked_in.jpg")  # no close event: only a rescan sees it
    got.wait_for("linked_in.jpg", timeout=3.0)


@needs_inotify
def test_on_ready_failure_does_not_stop_watching(inbox: Path) -> None:
    got = Collector()
    failures = []

    def flaky(path: Path) -> None:
        if not failures:
            failures.append(path)
            raise RuntimeError("queue full")
        got(path)

    watcher = InboxWatcher(inbox, BASE, flaky)
    watcher.start()
    try:
        (inbox / "first.jpg").write_bytes(b"x")
        (inbox / "second.jpg").write_bytes(b"x")
        got.wait_for("second.jpg")
        assert [p.name for p in failures] == ["first.jpg"]
    finally:
        watcher.stop()


# -- polling mode --------------------------------------------------------------------------


def test_polling_delivers_after_quiet_period(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path
) -> None:
    watcher, got = make_watcher(POLLING)
    assert watcher.mode == "polling"
    write_slowly(inbox / "grow.jpg", chunks=5, pause=0.2)
    last_write_ns = (inbox / "grow.jpg").stat().st_mtime_ns
    got.wait_for("grow.jpg")
    # The file's own mtime says when it last changed, however late this thread got to run;
    # the kernel's coarse timestamps can only make it earlier.
    assert got.wall_ns[inbox / "grow.jpg"] - last_write_ns >= POLLING.quiet_s * 1e9
    (inbox / "x.jpg.part").write_bytes(b"x")
    (inbox / "x.jpg.part").rename(inbox / "x.jpg")
    (inbox / ".hidden").write_bytes(b"x")
    got.wait_for("x.jpg")
    time.sleep(0.5)
    assert got.names() == ["grow.jpg", "x.jpg"]


def test_polling_startup_scan_uses_quiet_period(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path
) -> None:
    (inbox / "present.jpg").write_bytes(b"x")
    age(inbox / "present.jpg", 60)
    started = time.monotonic()
    _, got = make_watcher(POLLING)
    assert got.names() == []
    got.wait_for("present.jpg")
    assert got.time_of("present.jpg") - started >= POLLING.quiet_s * 0.9
    assert got.names() == ["present.jpg"]


# -- recovery and shutdown -----------------------------------------------------------------


@pytest.mark.parametrize("cfg", [BASE, POLLING], ids=["inotify", "polling"])
def test_inbox_deleted_and_recreated(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path, cfg: WatchConfig
) -> None:
    if not cfg.polling and not LINUX:
        pytest.skip("inotify is Linux-only")
    _, got = make_watcher(dataclasses.replace(cfg, rescan_interval_s=0.3))
    shutil.rmtree(inbox)
    inbox.mkdir()
    (inbox / "after.jpg").write_bytes(b"x")
    got.wait_for("after.jpg")
    # And files that arrive once the watch has been rebuilt come through events.
    time.sleep(0.5)
    (inbox / "later.jpg").write_bytes(b"x")
    got.wait_for("later.jpg")


@needs_inotify
def test_inbox_deleted_is_recreated_by_the_watcher(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]], inbox: Path
) -> None:
    _, got = make_watcher(dataclasses.replace(BASE, rescan_interval_s=0.3))
    shutil.rmtree(inbox)
    deadline = time.monotonic() + 5.0
    while not inbox.is_dir():
        assert time.monotonic() < deadline, "inbox was not recreated"
        time.sleep(0.05)
    time.sleep(0.4)  # one more timer tick: the watch is rebuilt right after the mkdir
    (inbox / "dropped.jpg").write_bytes(b"x")
    got.wait_for("dropped.jpg")


@pytest.mark.parametrize("cfg", [BASE, POLLING], ids=["inotify", "polling"])
def test_stop_is_prompt_and_leaves_no_threads(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]],
    inbox: Path,
    cfg: WatchConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not cfg.polling and not LINUX:
        pytest.skip("inotify is Linux-only")
    before = set(threading.enumerate())
    watcher, _ = make_watcher(dataclasses.replace(cfg, rescan_interval_s=0.3), start=False)
    (inbox / "pending.jpg").write_bytes(b"x")
    age(inbox / "pending.jpg", -3600)  # recent: its quiet period is in flight at stop()
    watcher.start()
    assert watcher.waiting == {inbox / "pending.jpg"}
    with caplog.at_level(logging.WARNING, logger="segd.service.watcher"):
        watcher.stop()
    # Prompt: every thread ended on its own signal, none needed stop()'s join timeout
    # (a thread still alive after it would also still be listed here).
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]
    assert set(threading.enumerate()) - before == set()


# -- the inotify watch limit -----------------------------------------------------------------


class WatchLimit:
    """Makes watchdog's inotify_add_watch fail with ENOSPC past `limit` watched paths, the
    way the kernel reports fs.inotify.max_user_watches; below it the real call runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
        from watchdog.observers import inotify_c

        self.limit = limit
        self.refused: list[bytes] = []
        self._watched: set[bytes] = set()
        self._real = inotify_c.inotify_add_watch
        monkeypatch.setattr(inotify_c, "inotify_add_watch", self._add_watch)

    def _add_watch(self, fd: int, path: bytes, mask: int) -> int:
        if path not in self._watched and len(self._watched) >= self.limit:
            self.refused.append(path)
            ctypes.set_errno(errno.ENOSPC)
            return -1
        wd = self._real(fd, path, mask)
        if wd >= 0:
            self._watched.add(path)
        return wd


def limit_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "max_user_watches" in r.getMessage()
    ]


@needs_inotify
def test_watch_limit_polls_only_the_folders_it_cannot_watch(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]],
    inbox: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    leaves = []
    for i in range(4):
        (inbox / f"d{i}" / "sub").mkdir(parents=True)
        leaves.append(inbox / f"d{i}" / "sub")
    limit = WatchLimit(monkeypatch, 2)  # the inbox and one folder
    caplog.set_level(logging.INFO, logger="segd.service.watcher")
    cfg = dataclasses.replace(BASE, recursive=True, poll_interval_s=0.1, quiet_s=0.3)
    watcher, got = make_watcher(cfg)
    assert limit.refused, "the simulated limit was never reached"
    assert watcher.mode == "inotify"  # the rest of the inbox keeps its watches
    polled = watcher.unwatched
    assert polled and inbox not in polled
    # Every leaf folder is watched or polled; the warning says what to raise, and once.
    warnings = limit_warnings(caplog)
    assert len(warnings) == 1
    assert "sysctl" in warnings[0] and str(inbox) in warnings[0]
    assert all(any(leaf.is_relative_to(p) for p in polled) for leaf in leaves)

    # Files written in folders nobody watches arrive through the poll; a file in the
    # inbox itself still arrives through its close event.
    for i, leaf in enumerate(leaves):
        (leaf / f"p{i}.jpg").write_bytes(b"x" * 100)
    (inbox / "top.jpg").write_bytes(b"x")
    got.wait_for("top.jpg", *[f"p{i}.jpg" for i in range(4)])

    # A folder made later, with no watch left for it, is polled too.
    (inbox / "late").mkdir()
    wait_until(lambda: inbox / "late" in watcher.unwatched, "late/ to be polled")
    (inbox / "late" / "q.jpg").write_bytes(b"x")
    got.wait_for("q.jpg")
    assert len(limit_warnings(caplog)) == 1  # later folders are logged at INFO

    # Polled files are delivered once, not at every poll: listing them again is no news.
    (leaves[0] / "sentinel.jpg").write_bytes(b"x")
    got.wait_for("sentinel.jpg")
    names = got.names()
    assert sorted(names) == sorted(
        ["top.jpg", "q.jpg", "sentinel.jpg"] + [f"p{i}.jpg" for i in range(4)]
    )


@needs_inotify
def test_watch_limit_at_the_inbox_itself_polls_the_whole_inbox(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]],
    inbox: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    WatchLimit(monkeypatch, 0)
    caplog.set_level(logging.WARNING, logger="segd.service.watcher")
    watcher, got = make_watcher(dataclasses.replace(BASE, recursive=True))
    assert watcher.mode == "polling"
    warnings = limit_warnings(caplog)
    assert len(warnings) == 1 and "sysctl -w fs.inotify.max_user_watches" in warnings[0]
    (inbox / "a.jpg").write_bytes(b"x")
    got.wait_for("a.jpg")


@needs_inotify
def test_inotify_instance_limit_polls_the_whole_inbox(
    make_watcher: Callable[..., tuple[InboxWatcher, Collector]],
    inbox: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from watchdog.observers import inotify_c

    def no_instance_left() -> int:
        ctypes.set_errno(errno.EMFILE)
        return -1

    monkeypatch.setattr(inotify_c, "inotify_init", no_instance_left)
    caplog.set_level(logging.WARNING, logger="segd.service.watcher")
    watcher, got = make_watcher()
    assert watcher.mode == "polling"
    assert any("fs.inotify.max_user_instances" in r.getMessage() for r in caplog.records)
    (inbox / "a.jpg").write_bytes(b"x")
    got.wait_for("a.jpg")


# Runs in a user namespace, where fs.inotify.max_user_watches has a per-namespace copy
# (/proc/sys/user/max_inotify_watches) that its root may lower for its own processes.
_REAL_LIMIT_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, time
    from pathlib import Path

    try:
        Path("/proc/sys/user/max_inotify_watches").write_text("4")
    except OSError as exc:
        print(json.dumps({"skip": f"cannot lower the limit: {exc}"}))
        sys.exit(0)

    from segd.config import WatchConfig
    from segd.service.watcher import InboxWatcher

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.warnings = []
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                self.warnings.append(record.getMessage())

    records = Records()
    logging.getLogger("segd").addHandler(records)
    logging.getLogger("segd").setLevel(logging.INFO)
    inbox = Path(sys.argv[1])
    leaves = [inbox / f"d{i}" / "sub" for i in range(6)]
    for leaf in leaves:
        leaf.mkdir(parents=True)
    got = []
    cfg = WatchConfig(recursive=True, rescan_interval_s=0, quiet_s=0.3, poll_interval_s=0.1)
    watcher = InboxWatcher(inbox, cfg, lambda p: got.append(p.name))
    watcher.start()
    try:
        for i, leaf in enumerate(leaves):
            (leaf / f"p{i}.jpg").write_bytes(b"x")
        (inbox / "top.jpg").write_bytes(b"x")
        want = {"top.jpg", *(f"p{i}.jpg" for i in range(6))}
        deadline = time.monotonic() + 20
        while not want <= set(got) and time.monotonic() < deadline:
            time.sleep(0.05)
        print(json.dumps({
            "mode": watcher.mode,
            "polled": len(watcher.unwatched),
            "delivered": sorted(got),
            "warnings": records.warnings,
        }))
    finally:
        watcher.stop()
    """
)


@needs_inotify
def test_real_watch_limit_in_a_user_namespace(inbox: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to lower the inotify watch limit in a user namespace")
    proc = subprocess.run(
        [
            unshare,
            "--user",
            "--map-root-user",
            sys.executable,
            "-c",
            _REAL_LIMIT_SCRIPT,
            str(inbox),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 and "unshare" in proc.stderr and not proc.stdout:
        pytest.skip(f"cannot make a user namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["mode"] == "inotify"
    assert result["polled"] >= 1
    assert result["delivered"] == sorted({"top.jpg", *(f"p{i}.jpg" for i in range(6))})
    limit_lines = [w for w in result["warnings"] if "max_user_watches" in w]
    assert len(limit_lines) == 1 and "sysctl" in limit_lines[0], result["warnings"]
    assert "4 in this user namespace" in limit_lines[0]  # the limit that actually applied


@needs_inotify
def test_the_emitters_stop_race_is_no_error(inbox: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """watchdog's own inotify emitter, asked for events after its stop closed the handle
    (what its thread does when stop() wakes it at the wrong moment), logs an ERROR; segd
    shows it as a DEBUG line, and any other ERROR of that logger as it is."""
    from watchdog.observers.api import EventQueue, ObservedWatch
    from watchdog.observers.inotify import InotifyEmitter
    from watchdog.observers.inotify_c import InotifyFD

    watchdog_log = logging.getLogger("watchdog.observers.inotify")
    fd = InotifyFD()  # its own, not the process-wide one: the test stops it
    fd.start()
    emitter = InotifyEmitter(EventQueue(), ObservedWatch(inbox, recursive=False),
                             inotify_fd=fd)
    emitter.on_thread_start()
    emitter.on_thread_stop()
    fd.stop()
    fd.join()
    with caplog.at_level(logging.INFO):
        emitter.queue_events(0)
        watchdog_log.error("some other failure")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "some other failure")]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=watchdog_log.name):
        emitter.queue_events(0)
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert "thread is inactive" in caplog.records[0].getMessage()
