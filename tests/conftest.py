"""Suite-wide guard: a test that leaves a thread running behind it fails.

A leaked thread (a watcher never stopped, a server never joined, a worker stuck on a lock)
keeps running into the next tests, where it moves files, holds descriptors and makes
failures appear far from their cause. Every thread started during a test must be gone
when the test's fixtures are torn down, after a short grace for threads that are already
on their way out. The check runs last: autouse fixtures are set up first and torn down
after every fixture the test asked for, so servers and observers stopped by fixtures are
stopped before it looks.

A test that must leave a thread behind says so with ``@pytest.mark.thread_leak_ok(reason)``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

# Seconds given to threads that are already ending (a join that has just been asked for).
JOIN_GRACE_S = 2.0
# Threads the test framework owns (pytest-timeout's and faulthandler's watchers, when those
# plugins are used), and one library singleton: tqdm starts a single monitor thread per
# process with its first bar and reuses it for every later bar until the process exits,
# so it outlives the first test that draws a bar without being that test's leak.
FRAMEWORK_THREADS: tuple[str, ...] = ("pytest_timeout", "faulthandler", "tqdm_monitor")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "thread_leak_ok(reason): the test may leave threads running behind it")


def _framework_owned(thread: threading.Thread) -> bool:
    return thread.name.startswith(FRAMEWORK_THREADS)


def leaked_threads(before: set[threading.Thread], grace_s: float) -> list[threading.Thread]:
    """Threads started since `before` still alive after `grace_s` seconds of joining."""
    new = [t for t in threading.enumerate()
           if t not in before and t is not threading.current_thread()
           and not _framework_owned(t)]
    deadline = time.monotonic() + grace_s
    for thread in new:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in new if t.is_alive()]


@pytest.fixture(autouse=True)
def no_thread_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    if request.node.get_closest_marker("thread_leak_ok") is not None:
        return
    leaked = leaked_threads(before, JOIN_GRACE_S)
    if leaked:
        names = ", ".join(f"{t.name} (daemon={t.daemon})" for t in leaked)
        pytest.fail(f"the test left {len(leaked)} thread(s) running: {names}", pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`segd sort` keeps an embedding cache under $XDG_CACHE_HOME: no test, nor any process
    a test starts, may write into the real home's."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved
