"""The real daemon speaking sd_notify to a real AF_UNIX datagram socket standing in for
systemd (tests/support/notify_listener.py), as `Type=notify` with `WatchdogSec=` in
systemd/segd.service expects:

- READY=1 once the model is loaded and its provider verified (the model line is already in
  the log when the datagram arrives), with a STATUS= line; nothing before it;
- RELOADING=1 (with MONOTONIC_USEC) then READY=1 on SIGHUP, for a good and a broken file;
- WATCHDOG=1 at half of WATCHDOG_USEC from READY on, never a gap systemd would kill for,
  also while a long refit runs; none at all without WATCHDOG_USEC;
- STOPPING=1 on SIGTERM, and nothing after it but the exit.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from daemon_harness import photos
from notify_listener import NotifyListener
from reliability_env import Env

slow = pytest.mark.slow

MODEL_LINE = re.compile(r" INFO model \S+ \(.*\) on (CPU|GPU) \(")
WATCHDOG_USEC = 3_000_000  # the daemon pings every 1.5 s at most (its main loop ticks at 1 s)
QUIET: dict[str, Any] = {"clustering": {"refit_growth": 0, "refit_interval_s": 0}}


@slow
def test_ready_reload_status_and_stopping(
        make_notified_env: Callable[..., tuple[Env, NotifyListener]]) -> None:
    env, listener = make_notified_env(QUIET)
    env.daemon.start(timeout=120)
    ready = listener.wait_for("READY", "1")
    assert MODEL_LINE.search(ready.seen), (
        "READY=1 arrived before the model and its provider were verified; the log then:\n"
        + ready.seen)
    assert "watching" in ready.seen
    assert re.fullmatch(r"\d+ sorted, \d+ pending, \d+ quarantined, queue \d+, "
                        r"(\d+ clusters|no clusters yet \(.*\)), on (CPU|GPU)",
                        ready.fields["STATUS"]), ready.fields
    assert not listener.having("WATCHDOG"), "pings without WATCHDOG_USEC"

    # Work shows in STATUS= lines (every 10 s, and at READY after a reload).
    env.seed(12)

    # A good reload: RELOADING=1 (with the monotonic time), then READY=1 again.
    mark = len(listener.snapshot())
    env.daemon.signal(signal.SIGHUP)
    reloading = listener.wait_for("RELOADING", "1", start=mark)
    assert 0 < int(reloading.fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    again = listener.wait_for("READY", "1", start=mark)
    assert again.at >= reloading.at
    assert "config reloaded from" in again.seen
    assert again.fields["STATUS"].startswith("12 sorted, 0 pending"), again.fields

    # A broken file: RELOADING=1, then READY=1 saying the reload failed (the old config runs).
    good = env.config.read_text(encoding="utf-8")
    env.config.write_text(good + "clustering: [\n", encoding="utf-8")
    mark = len(listener.snapshot())
    env.daemon.signal(signal.SIGHUP)
    listener.wait_for("RELOADING", "1", start=mark)
    failed = listener.wait_for("READY", "1", start=mark)
    assert failed.fields["STATUS"].startswith("reload failed:"), failed.fields
    env.config.write_text(good, encoding="utf-8")

    # SIGTERM: STOPPING=1, and nothing after it.
    mark = len(listener.snapshot())
    env.daemon.stop(timeout=60)
    after = listener.snapshot()[mark:]
    assert [m.fields for m in after] == [{"STOPPING": "1"}], [m.raw for m in after]
    env.finish(stop=False, allowed_errors=("config reload failed",))


@slow
def test_watchdog_pings_also_during_a_long_refit(
        make_notified_env: Callable[..., tuple[Env, NotifyListener]]) -> None:
    """WATCHDOG_USEC = 3 s. The first fit, over all 40 photos, is made costly (k up to 39
    with 100 KMeans runs each: about 10 s on a quiet 2-core machine, far more than one ping
    interval on any) and runs on its own thread; the main loop keeps pinging through it."""
    env, listener = make_notified_env(
        {"clustering": {"refit_growth": 0, "refit_interval_s": 0, "min_images": 40,
                        "k_max": 39, "n_init": 100}},
        {"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    env.daemon.start(timeout=120)
    ready = listener.wait_for("READY", "1")
    env.copy(photos(), "seed_")
    began = listener.wait_for("STATUS", "refitting (first fit)", timeout=120).at
    env.daemon.wait_for_log(r"INFO refit \(first fit\)", timeout=300)
    ended = time.monotonic()
    env.tree.wait_drained(40, 120, env.daemon)
    pings = [m.at for m in listener.having("WATCHDOG", "1")]
    during = [t for t in pings if began <= t <= ended]
    print(f"\n[watchdog] the first fit ran {ended - began:.1f} s with {len(during)} pings; "
          f"{len(pings)} pings in all")
    assert ended - began >= 2.5, "the refit was too short to show anything; make it costlier"
    assert len(during) >= 2, (during, began, ended)
    # From READY on, never a silence that would make systemd kill the service.
    times = [ready.at, *(t for t in pings if t >= ready.at), time.monotonic()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < WATCHDOG_USEC / 1e6, f"longest gap between pings {max(gaps):.2f} s"
    env.finish()
