"""The store lock: one writer, a clear message naming the holder, no stale locks."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from segd.core.errors import StoreError
from segd.state.lock import acquire_state_lock, read_lock_holder

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from segd.state.lock import acquire_state_lock
    lock = acquire_state_lock(Path(sys.argv[1]), role=sys.argv[2])
    print("locked", flush=True)
    time.sleep(120)
    """
)


def start_holder(path: Path, role: str = "refit") -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), role],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != "locked":
        child.kill()
        child.wait()
        pytest.fail(f"the child did not take the lock: {line!r}")
    return child


def test_acquire_writes_pid_role_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "segd.lock"
    with acquire_state_lock(path, role="sort") as lock:
        assert lock.held
        assert path.read_text() == f"{os.getpid()} sort\n"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert read_lock_holder(path) == (os.getpid(), "sort")
    assert not lock.held
    assert read_lock_holder(path) is None
    assert path.exists()  # never deleted: see the module's docstring


def test_loose_mode_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "segd.lock"
    path.write_text("")
    path.chmod(0o644)
    with acquire_state_lock(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_second_acquire_in_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "segd.lock"
    with (
        acquire_state_lock(path, role="daemon"),
        pytest.raises(StoreError, match=rf"pid {os.getpid()} \(daemon\)"),
    ):
        acquire_state_lock(path, role="refit")
    with acquire_state_lock(path, role="refit"):
        pass


def test_release_is_idempotent(tmp_path: Path) -> None:
    lock = acquire_state_lock(tmp_path / "segd.lock")
    lock.release()
    lock.release()
    assert read_lock_holder(tmp_path / "segd.lock") is None


def test_no_lock_file_means_no_holder(tmp_path: Path) -> None:
    assert read_lock_holder(tmp_path / "absent.lock") is None


def test_stale_pid_in_file_is_not_a_holder(tmp_path: Path) -> None:
    # A pid written by a holder that is gone must not count: the kernel decides.
    path = tmp_path / "segd.lock"
    path.write_text("999999 daemon\n")
    assert read_lock_holder(path) is None
    with acquire_state_lock(path):
        pass


def test_unknown_role_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="role"):
        acquire_state_lock(tmp_path / "segd.lock", role="writer")


def test_unopenable_lock_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        acquire_state_lock(tmp_path / "missing-dir" / "segd.lock")


def test_other_process_holder_is_named_and_sigkill_releases(tmp_path: Path) -> None:
    path = tmp_path / "segd.lock"
    child = start_holder(path, role="refit")
    try:
        assert read_lock_holder(path) == (child.pid, "refit")
        with pytest.raises(StoreError, match=rf"pid {child.pid} \(refit\)"):
            acquire_state_lock(path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    # The kernel dropped the flock with the dead process; the pid line is still there.
    assert path.read_text().startswith(f"{child.pid} ")
    assert read_lock_holder(path) is None
    with acquire_state_lock(path, role="daemon"):
        assert read_lock_holder(path) == (os.getpid(), "daemon")


def test_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    # A decode worker forked from the daemon must not hold the store after the daemon
    # lets go (or dies): the child closes its inherited descriptor right after fork.
    path = tmp_path / "segd.lock"
    lock = acquire_state_lock(path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(write_end)
            os.read(read_end, 1)  # wait until the parent has released
            os._exit(0)
        except BaseException:
            os._exit(1)
    try:
        os.close(read_end)
        lock.release()
        assert read_lock_holder(path) is None  # the live child holds nothing
        with acquire_state_lock(path):
            pass
    finally:
        os.close(write_end)
        os.waitpid(pid, 0)
