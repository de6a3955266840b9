"""The real daemon refits by itself: when the collection has grown by `refit_growth`, and
every `refit_interval_s`; and $SEGD_ALLOW_ROOT decides whether it runs as root at all.

Each refit the daemon runs is logged with its trigger and the collection size,
``refit (grew from 10 to 15 images): n=15 ...`` or ``refit (interval): n=...``; the
tests read those lines and the store's record of the fits.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import photos, segd_cli, status_json, wait_until
from reliability_env import Env

slow = pytest.mark.slow

GROWTH = re.compile(r"INFO refit \(grew from (\d+) to (\d+) images\): n=(\d+)")
INTERVAL = re.compile(r"INFO refit \(interval\): n=(\d+)")


@pytest.fixture
def envs(tmp_path: Path) -> Iterator[list[Env]]:
    made: list[Env] = []
    yield made
    for env in made:
        env.daemon.cleanup()
        print(f"\n==== {env.root}: {env.tree.describe()}")
        print(env.daemon.log_tail(80))


def make(envs: list[Env], tmp_path: Path, overrides: dict[str, Any],
         extra_env: dict[str, str] | None = None) -> Env:
    env = Env(tmp_path / f"segd{len(envs)}", overrides)
    env.daemon.extra_env = dict(extra_env or {})
    envs.append(env)
    return env


@slow
def test_growth_triggers_a_refit_at_the_threshold_and_not_before(
        envs: list[Env], tmp_path: Path) -> None:
    """refit_growth 0.5: after the first fit over 10 images the next refit comes at 15,
    the one after at 23 (15 * 1.5 rounded up). Photos are added one at a time, each
    waited for, so a refit that came too early would show a smaller n."""
    env = make(envs, tmp_path, {"clustering": {"refit_growth": 0.5, "refit_interval_s": 0,
                                               "settle_s": 0}})
    env.daemon.start(timeout=120)
    env.seed(10)
    env.daemon.wait_for_log(r"INFO refit \(first fit\): n=10\b")
    ph = photos()
    for i in range(10, 24):
        env.copy([ph[i]], "grow_")
        env.tree.wait_drained(i + 1, 60, env.daemon)
        if i + 1 in (15, 23):  # the threshold is reached: its refit comes next
            env.daemon.wait_for_log(rf"INFO refit \(grew from \d+ to {i + 1} images\)",
                                    timeout=60)
    growths = [tuple(map(int, m)) for m in GROWTH.findall(env.daemon.log())]
    assert growths == [(10, 15, 15), (15, 23, 23)], growths
    assert status_json(env.config)["last_fit"]["trigger"] == "grew from 15 to 23 images"
    env.finish()


@slow
def test_interval_triggers_refits_no_sooner_than_the_interval(
        envs: list[Env], tmp_path: Path) -> None:
    interval = 3.0
    env = make(envs, tmp_path, {"clustering": {"refit_growth": 0,
                                               "refit_interval_s": interval, "settle_s": 0}})
    env.daemon.start(timeout=120)
    env.seed(12)
    fits: list[tuple[float, str]] = []

    def three_fits() -> bool:
        last = status_json(env.config)["last_fit"]
        if last is not None and (not fits or last["at"] != fits[-1][0]):
            fits.append((last["at"], last["trigger"]))
        return len(fits) >= 3

    wait_until(three_fits, 120, "two refits after the first fit", interval=0.2,
               on_timeout=env.daemon.log_tail)
    print(f"\n[interval] fits: {fits}")
    assert [t for _, t in fits[-2:]] == ["interval", "interval"], fits
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(fits)]
    assert min(gaps[-2:]) >= interval - 0.1, gaps  # never sooner than the interval
    assert len(INTERVAL.findall(env.daemon.log())) >= 2
    env.finish()


# ---- root: $SEGD_ALLOW_ROOT beats the config


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("only meaningful as root")


@pytest.mark.usefixtures("as_root")
def test_segd_allow_root_0_refuses_the_daemon(envs: list[Env], tmp_path: Path) -> None:
    env = make(envs, tmp_path, {"allow_root": True})  # the config allows it; the env wins
    started = time.monotonic()
    done = segd_cli(env.config, "run", timeout=60, extra_env={"SEGD_ALLOW_ROOT": "0"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refusing to run the daemon as root" in done.stderr, done.stderr
    assert "SEGD_ALLOW_ROOT=1" in done.stderr, done.stderr
    assert not (env.folders.state_dir / "control.sock").exists()
    print(f"\n[root] refused in {time.monotonic() - started:.1f} s")
    done = segd_cli(env.config, "run", timeout=120, extra_env={"SEGD_ALLOW_ROOT": "maybe"})
    assert done.returncode == 1 and "SEGD_ALLOW_ROOT must be 1, 0 or warn" in done.stderr, (
        done.stderr)


@pytest.mark.usefixtures("as_root")
def test_segd_allow_root_1_runs_the_daemon(envs: list[Env], tmp_path: Path) -> None:
    env = make(envs, tmp_path, {"allow_root": False}, {"SEGD_ALLOW_ROOT": "1"})
    env.daemon.start(timeout=120)
    assert "running as ROOT" not in env.daemon.log()
    env.copy(photos()[:2], "root_")
    wait_until(lambda: status_json(env.config)["counts"]["pending"] == 2, 60,
               "the daemon running as root to take arrivals", on_timeout=env.daemon.log_tail)
    env.finish()
