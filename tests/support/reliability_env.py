"""Shared pieces of the reliability tests: one test's folder tree, daemon and ledger, real
mounts (tmpfs, read-only remounts) and an unprivileged user for the daemon.

Everything here is real: subprocesses, signals, mounts, users. Where the machine does not
allow a fault (no CAP_SYS_ADMIN for mount, no user switching, /dev/shm on the same
filesystem), the helpers skip the test with a message saying so; CI runs as root and has
all of them.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, Tree, as_user, copy_photos, photos, write_config
from invariant import DropLedger, Sentinel, check_invariant

from segd.state.store import open_store

# Log lines at ERROR level that are not segd's: watchdog's inotify emitter may log this once
# when the observer is stopped at shutdown while its thread is between two reads (a race
# inside watchdog, harmless: the daemon exits 0 and nothing is lost). Expected conditions
# such as a full or read-only library are warnings, not errors.
EXPECTED_ERRORS: tuple[str, ...] = (
    "InotifyEmitter.queue_events() called when the thread is inactive",)


class Env:
    """One test's folder tree (any folder may live elsewhere), daemon and drop ledger."""

    def __init__(self, root: Path, overrides: dict[str, Any] | None = None,
                 run_as: tuple[int, int] | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.config = write_config(root, overrides)
        self.tree = Tree(self.config)
        self.daemon = DaemonProcess(self.config, run_as=run_as, extra_args=extra_args)
        self.ledger = DropLedger()
        # A folder beside segd's folders that nothing may touch.
        self.sentinels = [Sentinel.plant(root / "outside", photos()[0])]

    @property
    def folders(self) -> Any:
        return self.tree.folders

    def copy(self, sources: list[Path], prefix: str) -> list[Path]:
        return copy_photos(sources, self.tree.inbox, prefix, self.ledger)

    def drop_bytes(self, name: str, data: bytes) -> Path:
        path = self.tree.inbox / name
        path.write_bytes(data)
        self.ledger.record(path, data)
        return path

    def filed(self) -> int:
        _, lib, q = self.tree.counts()
        return lib + q

    def seed(self, n: int = 40, prefix: str = "seed_", timeout: float = 180) -> None:
        """`n` photos in, first fit done, all filed."""
        before = self.filed()
        self.copy(photos()[:n], prefix)
        self.tree.wait_drained(before + n, timeout, self.daemon)

    def pending_moves(self) -> int:
        store = open_store(self.folders.db, readonly=True)
        try:
            return len(store.pending_moves())
        finally:
            store.close()

    def check(self, **kwargs: Any) -> Any:
        return check_invariant(self.ledger, self.folders, outside=self.sentinels, **kwargs)

    def finish(self, stop: bool = True, allowed_errors: tuple[str, ...] = ()) -> Any:
        if stop and self.daemon.alive():
            self.daemon.stop(timeout=30)
        summary = self.check()
        ok = EXPECTED_ERRORS + allowed_errors
        errors = [e for e in self.daemon.errors_in_log() if not any(s in e for s in ok)]
        assert not errors, "errors in the daemon log:\n" + "\n".join(errors)
        print(f"\n[invariant] {summary.describe()}")
        return summary


# ---- real filesystems


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """Mount a fresh tmpfs of `size` at `path` (skip the test if mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")
    try:
        yield path
    finally:
        # A lazy unmount never fails on a busy mount (the daemon may still hold a folder fd).
        _run("umount", "-l", str(path))


def remount(path: Path, mode: str) -> None:
    done = _run("mount", "-o", f"remount,{mode}", str(path))
    assert done.returncode == 0, f"remount {mode} {path} failed: {done.stderr}"


def fill_up(folder: Path, name: str = "filler.bin") -> Path:
    """A file in `folder` that takes every free page of its filesystem; return it. Written
    unbuffered: a buffered writer would fail again at close with what it still holds."""
    filler = folder / name
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    fh.write(block)
    assert os.statvfs(folder).f_bavail == 0, "the filler left room"
    return filler


# ---- an unprivileged user for the daemon


def unprivileged_user() -> tuple[int, int]:
    """(uid, gid) of `nobody`, after proving this process can switch to it."""
    if os.geteuid() != 0:
        pytest.skip("running the daemon as another user needs root")
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    ids = (pw.pw_uid, pw.pw_gid)
    probe = [*as_user(ids), sys.executable, "-c",
             "import os, segd; print(os.getuid(), "
             "open('/proc/self/status').read().split('CapEff:')[1].split()[0])"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run segd as user nobody here (setpriv): {exc}")
    if done.returncode != 0 or done.stdout.split() != [str(ids[0]), "0" * 16]:
        pytest.skip(f"cannot run segd as user nobody here: {done.stdout} {done.stderr}")
    return ids


@contextlib.contextmanager
def shared_root(prefix: str) -> Iterator[Path]:
    """A folder under /tmp that another user can reach (pytest's tmp_path is 0700 root)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def chown_tree(path: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)

