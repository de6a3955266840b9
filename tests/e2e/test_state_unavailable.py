"""The real daemon when its state folder (the SQLite store, the move journal) cannot take
commits: filled to the last byte, read-only at start, and turned read-only under it by the
kernel. Every fault is real: a small tmpfs filled by a ballast file, a tmpfs remounted
`ro` (possible only while nothing holds a file open for writing: `remount,ro` fails with
EBUSY under a running SQLite), and an ext4 image on a loop device that the kernel aborts
the way it does on a disk error (`/sys/fs/ext4/<dev>/trigger_fs_error` with
`errors=remount-ro`). What the machine cannot do is skipped with the reason (CI runs as
root and can do all of it).

Each case ends with `check_invariant`: every photo exactly once, byte-identical, the store
agreeing with the disk, no open journal row.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import photos, segd_cli, status_json, wait_until
from notify_listener import Notification, NotifyListener
from reliability_env import Env, fill_up, remount, tmpfs

from segd.service.daemon import STATE_PROBE_S

slow = pytest.mark.slow

PAUSE_LINE = r"WARNING .*the state folder .* is (full|read-only|failing).*not taking files"
RESUME_LINE = r"INFO .*the state folder .* takes commits again"
# No growth or interval refits: the only refits are the ones the test asks for.
QUIET: dict[str, Any] = {"clustering": {"refit_growth": 0, "refit_interval_s": 0}}
# A refit every 2 s of quiet: none may run while paused, and they come back after.
EVERY_2_S: dict[str, Any] = {"clustering": {"refit_growth": 0, "refit_interval_s": 2}}


class OpenWatch:
    """Names of the files opened in `folder` from now on: a real inotify watch (IN_OPEN),
    the test's own, apart from the daemon's (which never asks for opens)."""

    IN_OPEN = 0x20
    IN_ISDIR = 0x40000000

    def __init__(self, folder: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"no inotify instance: {os.strerror(ctypes.get_errno())}")
        if libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_OPEN) < 0:
            os.close(self.fd)
            pytest.skip(f"no inotify watch: {os.strerror(ctypes.get_errno())}")

    def opened(self) -> set[str]:
        names: set[str] = set()
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset < len(buf):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
                name = buf[offset + 16:offset + 16 + length].rstrip(b"\0")
                if not mask & self.IN_ISDIR:
                    names.add(os.fsdecode(name))
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def _unread_while_paused(env: Env, dropped: list[Path]) -> None:
    """Through three more probe intervals (three and more inbox rescans hand the files to
    intake), the daemon stays paused, opens none of them and changes none of them."""
    before = _snapshot(dropped)
    watch = OpenWatch(env.tree.inbox)
    try:
        start = _paused(env)
        assert start is not None
        wait_until(lambda: (p := _paused(env)) and p["for_s"] >= start["for_s"] + 3 * STATE_PROBE_S,
                   60, "three more probe intervals into the pause")
        opened = watch.opened()
    finally:
        watch.close()
    assert not opened & {p.name for p in dropped}, f"read while paused: {sorted(opened)}"
    _untouched(before)


def _paused(env: Env) -> dict[str, Any] | None:
    daemon = status_json(env.config)["daemon"]
    assert daemon is not None, "the daemon does not answer its control socket"
    return daemon["state_unavailable"]


def _paused_notes(listener: NotifyListener, start: int) -> list[Notification]:
    return [m for m in listener.having("STATUS", start=start)
            if m.fields["STATUS"].startswith("PAUSED, the state folder ")]


def _resumed_at(listener: NotifyListener, paused: Notification) -> float:
    """When the first STATUS= after `paused` that no longer says paused arrived."""
    after = [m for m in listener.having("STATUS") if m.at > paused.at
             and not m.fields["STATUS"].startswith("PAUSED")]
    assert after, listener.describe()
    return after[0].at


def _untouched(files: dict[Path, tuple[int, int, bytes]]) -> None:
    for path, (ino, mtime, data) in files.items():
        st = path.lstat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime) and path.read_bytes() == data, path


def _snapshot(paths: list[Path]) -> dict[Path, tuple[int, int, bytes]]:
    return {p: (p.lstat().st_ino, p.lstat().st_mtime_ns, p.read_bytes()) for p in paths}


def _refused(env: Env, *args: str) -> str:
    done = segd_cli(env.config, *args, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1, (args, out)
    assert f"the state folder {env.folders.state_dir}" in out, (args, out)
    return out


@slow
def test_state_folder_full_pauses_then_resumes(
        make_notified_env: Callable[..., tuple[Env, NotifyListener]]) -> None:
    """The state folder is a 16 MiB tmpfs. With 12 photos filed, a ballast file fills it to
    the last page; 12 more photos are dropped. The daemon pauses: one warning, `segd
    status` (text and --json) and STATUS= say why, naming the folder; the photos stay in
    the inbox untouched through several probes and rescans; `segd refit` and `segd undo`
    are refused naming the folder, and none of the interval refits (every 2 s otherwise)
    runs. The ballast removed, it resumes by itself (one line), files all 12 and refits
    again; then the invariant."""
    env, listener = make_notified_env(EVERY_2_S)
    state = env.folders.state_dir
    with tmpfs(state, "16m"):
        env.daemon.start(timeout=120)
        env.seed(12)
        ballast = fill_up(state, "ballast.bin")
        mark, notes = len(env.daemon.log()), len(listener.snapshot())
        dropped = env.copy(photos()[12:24], "full_")

        pause = wait_until(lambda: _paused(env), 60, "segd status to report the pause",
                           on_timeout=env.daemon.log_tail)
        assert pause["kind"] == "full", pause
        assert str(state) in pause["message"] and "full" in pause["message"], pause
        wait_until(lambda: _paused_notes(listener, notes), 30, "a STATUS= naming the pause",
                   on_timeout=listener.describe)
        env.daemon.wait_for_log(PAUSE_LINE, timeout=10, start=mark)

        # Several probes and inbox rescans (every 1 s) later: still paused, the photos in
        # the inbox unread and as dropped, and the log said it once, not once per file.
        _unread_while_paused(env, dropped)
        assert sorted(env.tree.inbox_files()) == sorted(dropped), env.tree.describe()
        assert env.daemon.alive()
        text = segd_cli(env.config, "status", timeout=60)
        assert text.returncode == 0, text.stderr
        assert f"PAUSED: the state folder {state} is full" in text.stdout, text.stdout
        _refused(env, "refit", "--k", "2")
        _refused(env, "undo")
        since = env.daemon.log()[mark:]
        assert len([ln for ln in since.splitlines() if "not taking files" in ln]) == 1, since
        assert "could not be filed" not in since, since

        paused_at = env.daemon.wait_for_log(PAUSE_LINE, timeout=10, start=mark).end()

        ballast.unlink()
        env.tree.wait_drained(24, 120, env.daemon)
        resumed = env.daemon.wait_for_log(RESUME_LINE, timeout=10, start=mark)
        during = env.daemon.log()[paused_at:resumed.start()]
        assert " INFO refit (" not in during, during
        paused_note = _paused_notes(listener, notes)[0]
        assert not [m for m in listener.having("STATUS", "refitting (interval)")
                    if paused_note.at <= m.at <= _resumed_at(listener, paused_note)]
        env.daemon.wait_for_log(r" INFO refit \(interval\)", timeout=60, start=resumed.end())
        assert _paused(env) is None
        assert env.daemon.log()[mark:].count("takes commits again") == 1
        # The STATUS= after the resume no longer says paused.
        latest = listener.having("STATUS")[-1].fields["STATUS"]
        assert not latest.startswith("PAUSED"), latest
        env.daemon.stop(timeout=30)
        summary = env.finish(stop=False)
        assert summary.sorted == 24, summary.describe()


def fill_at_once(folder: Path) -> Path:
    """Take every free page of `folder`'s filesystem in one call (posix_fallocate on tmpfs
    allocates them all or none): fast enough to land between two commits of a batch."""
    ballast = folder / "ballast.bin"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for _ in range(100):  # the daemon may take a page between statvfs and the call
            st = os.statvfs(folder)
            try:
                os.posix_fallocate(fd, 0, max(st.f_bavail - 1, 1) * st.f_frsize)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        os.lseek(fd, 0, os.SEEK_END)
        with contextlib.suppress(OSError):  # the last page or two
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return ballast


MAX_FILL_ROUNDS = 8


@slow
def test_state_folder_fills_inside_a_journaled_batch(
        make_notified_env: Callable[..., tuple[Env, NotifyListener]]) -> None:
    """The fault lands where the journal matters: each round drops 4 photos, watches the
    store for the batch's journal rows (committed before any file is touched), stops the
    daemon (SIGSTOP) the moment they appear, fills the state folder and lets it go on
    (SIGCONT), so the commit that closes them fails with the files already placed (a batch
    that closed before the stop landed makes the round a miss). At the resume every such
    move must be settled (one line each, as at start-up, and the resume line's count), and
    the invariant hold with the daemon still running: no open journal row, every photo
    once, rows matching the disk. Rounds go on (up to 8) until one leaves journal rows open
    at the pause."""
    env, _ = make_notified_env(QUIET)
    state = env.folders.state_dir
    with tmpfs(state, "16m"):
        env.daemon.start(timeout=120)
        env.seed(12)
        reader = sqlite3.connect(f"{(state / 'segd.db').as_uri()}?mode=ro", uri=True,
                                 isolation_level=None, check_same_thread=False)
        rounds: list[tuple[int, int]] = []  # (journal rows open at the pause, settled)

        def journal_rows() -> int:
            return int(reader.execute("SELECT count(*) FROM moves").fetchone()[0])

        def drained() -> bool:
            inbox, _, _ = env.tree.counts()
            return inbox == 0 and env.filed() >= len(env.ledger)
        try:
            while len(rounds) < MAX_FILL_ROUNDS and not any(o for o, _ in rounds):
                mark = len(env.daemon.log())
                env.copy(photos()[12 + 4 * len(rounds):16 + 4 * len(rounds)],
                         f"r{len(rounds)}_")
                wait_until(journal_rows, 60, "the batch's journal rows", interval=0.001)
                # Held by a real SIGSTOP between its journal commit and the next, the daemon
                # cannot close the batch while the folder fills.
                env.daemon.signal(signal.SIGSTOP)
                try:
                    ballast = fill_at_once(state)
                finally:
                    env.daemon.signal(signal.SIGCONT)
                wait_until(lambda: _paused(env) or (not journal_rows() and drained()), 60,
                           "the pause, or the batch closed before the stop",
                           on_timeout=env.daemon.log_tail)
                if not _paused(env):  # closed before the stop landed: the round missed
                    ballast.unlink()
                    rounds.append((0, 0))
                    continue
                open_rows = env.pending_moves()
                ballast.unlink()
                resumed = env.daemon.wait_for_log(
                    r"takes commits again .*; (\d+) interrupted move\(s\) settled",
                    timeout=60, start=mark)
                settled = int(resumed.group(1))
                env.tree.wait_drained(len(env.ledger), 60, env.daemon)
                wait_until(lambda: not _paused(env), 30, "the daemon to stay resumed")
                since = env.daemon.log()[mark:]
                assert settled == open_rows, (open_rows, settled, since)
                assert len(re.findall("recovered interrupted move", since)) == settled, since
                summary = env.check()  # while running: no open journal row allowed
                rounds.append((open_rows, settled))
        finally:
            reader.close()
        print(f"[fill rounds] (open at the pause, settled): {rounds}; {summary.describe()}")
        assert any(o for o, _ in rounds), f"no fill in {len(rounds)} rounds landed inside a batch"
        env.daemon.stop(timeout=30)
        env.finish(stop=False)


@slow
def test_read_only_state_folder_at_start_waits_then_starts(
        make_notified_env: Callable[..., tuple[Env, NotifyListener]]) -> None:
    """The state folder (a tmpfs, store made by a first run) remounted read-only while no
    daemon runs. `segd run` does not exit (systemd would restart it into the same wall):
    it logs why once, sends READY=1 with a STATUS= naming the folder, keeps pinging the
    watchdog, answers a reload (SIGHUP) and leaves dropped photos in the inbox; remounted
    read-write, it starts by itself and files them; then the invariant."""
    env, listener = make_notified_env(QUIET, {"WATCHDOG_USEC": "2000000"})
    state = env.folders.state_dir
    with tmpfs(state, "16m"):
        env.daemon.start(timeout=120)
        env.seed(12)
        env.daemon.stop(timeout=30)
        remount(state, "ro")
        try:
            notes = len(listener.snapshot())
            env.daemon.start(wait=False)

            def ready_while_waiting() -> list[Notification]:
                if not env.daemon.alive():
                    raise AssertionError(f"segd run exited instead of waiting:\n"
                                         f"{env.daemon.log_tail()}")
                return listener.having("READY", "1", start=notes)

            ready = wait_until(ready_while_waiting, 120, "READY=1 from the waiting daemon")[0]
            assert ready.fields["STATUS"].startswith(
                f"PAUSED, the state folder {state} is read-only"), ready.fields
            dropped = env.copy(photos()[12:18], "ro_")
            before = _snapshot(dropped)
            at = len(listener.snapshot())
            # Alive and waiting: pinging through several probe intervals.
            wait_until(lambda: len(listener.having("WATCHDOG", "1", start=at)) >= 4, 60,
                       "watchdog pings while waiting", on_timeout=env.daemon.log_tail)
            # `systemctl reload` meanwhile: answered, and no SIGHUP death.
            at = len(listener.snapshot())
            env.daemon.signal(signal.SIGHUP)
            listener.wait_for("RELOADING", "1", start=at)
            again = listener.wait_for("READY", "1", start=at)
            assert again.fields["STATUS"] == ready.fields["STATUS"], again.fields
            assert env.daemon.alive()
            _untouched(before)
            assert env.daemon.log().count("waiting for it before starting") == 1
        finally:
            remount(state, "rw")
        env.daemon.wait_ready(timeout=120)
        env.tree.wait_drained(18, 120, env.daemon)
        env.daemon.stop(timeout=30)
        summary = env.finish(stop=False)
        assert summary.sorted == 18, summary.describe()


# ---- the kernel turns the state filesystem read-only under the running daemon


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def ext4_image(path: Path, image: Path, size_mb: int = 32) -> Iterator[str]:
    """An ext4 filesystem in `image` on a loop device mounted at `path`, with
    `errors=remount-ro`; yields the device's name (skip where loop devices, mkfs.ext4 or
    the ext4 fault trigger are not available)."""
    for tool in ("losetup", "mkfs.ext4", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with open(image, "wb") as fh:
        fh.truncate(size_mb << 20)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    assert made.returncode == 0, made.stderr
    attached = _run("losetup", "--find", "--show", str(image))
    if attached.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        path.mkdir(parents=True, exist_ok=True)
        mounted = _run("mount", "-o", "errors=remount-ro", device, str(path))
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount ext4 from a loop device: {mounted.stderr.strip()}")
        if not Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").exists():
            _run("umount", str(path))
            pytest.skip("this kernel has no ext4 trigger_fs_error")
        yield Path(device).name
    finally:
        _run("umount", "-l", str(path))
        _run("losetup", "-d", device)


def _abort_ext4(device: str) -> None:
    Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("segd test\n")


@slow
def test_state_filesystem_turned_read_only_under_the_daemon(
        make_notified_env: Callable[..., tuple[Env, NotifyListener]], tmp_path: Path) -> None:
    """The state folder is an ext4 image on a loop device, `errors=remount-ro`. With 12
    photos filed, the kernel aborts it (as on a disk error): it is read-only from then on,
    and a live `remount,rw` is refused until it is checked. The daemon pauses and says so
    (status, STATUS=), the 6 photos dropped next stay in the inbox, a refit is refused;
    SIGTERM still stops it cleanly. After `e2fsck` and a fresh mount, a restart settles
    what was interrupted and files them; then the invariant."""
    env, listener = make_notified_env(QUIET)
    state = env.folders.state_dir
    image = tmp_path / "state.ext4"
    with ext4_image(state, image) as device:
        env.daemon.start(timeout=120)
        env.seed(12)
        mark, notes = len(env.daemon.log()), len(listener.snapshot())
        _abort_ext4(device)
        dropped = env.copy(photos()[12:18], "ro_")
        pause = wait_until(lambda: _paused(env), 60, "segd status to report the pause",
                           on_timeout=env.daemon.log_tail)
        assert pause["kind"] in ("read-only", "failing"), pause
        assert str(state) in pause["message"], pause
        wait_until(lambda: _paused_notes(listener, notes), 30, "a STATUS= naming the pause",
                   on_timeout=listener.describe)
        _unread_while_paused(env, dropped)
        _refused(env, "refit", "--k", "2")
        env.daemon.stop(timeout=60)
        since = env.daemon.log()[mark:]
        assert len([ln for ln in since.splitlines() if "not taking files" in ln]) == 1, since

        # The administrator's repair: unmount, check, mount again.
        done = _run("umount", str(state))
        assert done.returncode == 0, done.stderr
        fsck = _run("e2fsck", "-fy", f"/dev/{device}")
        assert fsck.returncode in (0, 1, 2), fsck.stdout + fsck.stderr
        done = _run("mount", "-o", "errors=remount-ro", f"/dev/{device}", str(state))
        assert done.returncode == 0, done.stderr
        env.daemon.start(timeout=120)
        env.tree.wait_drained(18, 120, env.daemon)
        env.daemon.stop(timeout=30)
        summary = env.finish(stop=False)
        assert summary.sorted == 18, summary.describe()
        assert os.stat(state).st_dev != os.stat(env.tree.inbox).st_dev
