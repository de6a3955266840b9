"""SIGHUP on the real daemon: a valid new config is applied, a broken one changes nothing,
and what cannot change under a running daemon waits for a restart, saying so.

The running values are read from the daemon itself, never from the file:
- the clustering values: a dry-run refit asked over the control socket answers with the
  score of every k it tried, k_min..k_max of the config in force (clipped to n - 1);
- the log level: each control request is logged at DEBUG before it is answered, so once
  an answer is back the log holds that line exactly when the level in force is DEBUG;
- inbox and library: where a photo dropped into the old inbox goes.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import BASE_CONFIG, merge, photos, wait_until
from reliability_env import Env

from segd.service import control

slow = pytest.mark.slow

START: dict[str, Any] = {"log_level": "INFO",
                         "clustering": {"k_max": 6, "refit_growth": 0, "refit_interval_s": 0}}
DEBUG_LINE = r"DEBUG control request 'status' from uid \d+"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path / "segd", START)
    yield e
    e.daemon.cleanup()
    print(e.daemon.log_tail(80))


def write(env: Env, overrides: dict[str, Any], tail: str = "") -> None:
    text = yaml.safe_dump(merge(merge(BASE_CONFIG, START), overrides), sort_keys=False)
    env.config.write_text(text + tail, encoding="utf-8")


def hup(env: Env, expect: str) -> str:
    """SIGHUP, and the log line (regex `expect`) saying how the reload went."""
    mark = len(env.daemon.log())
    env.daemon.signal(signal.SIGHUP)
    return env.daemon.wait_for_log(expect, timeout=60, start=mark).group(0)


def ask(env: Env, message: dict[str, Any]) -> dict[str, Any]:
    answer = control.request(env.folders.state_dir / "control.sock", message, timeout=120)
    assert answer["ok"], answer
    return answer


def ks_in_force(env: Env) -> list[int]:
    """The k a refit of the running daemon tries (a dry run: nothing changes)."""
    report = ask(env, {"cmd": "refit", "k": None, "dry_run": True})["refit"]
    return sorted(int(k) for k in report["scores"])


def debug_in_force(env: Env) -> bool:
    mark = len(env.daemon.log())
    ask(env, {"cmd": "status"})
    return re.search(DEBUG_LINE, env.daemon.log()[mark:]) is not None


@slow
def test_valid_reload_applied_broken_ones_change_nothing(env: Env) -> None:
    env.daemon.start(timeout=120)
    env.seed(12)
    assert ks_in_force(env) == [2, 3, 4, 5, 6]
    assert not debug_in_force(env)

    # A valid file: both changes are in force as soon as the reload is logged.
    write(env, {"log_level": "DEBUG", "clustering": {"k_max": 4}})
    hup(env, r"INFO config reloaded from")
    assert ks_in_force(env) == [2, 3, 4]
    assert debug_in_force(env)

    # Broken files carrying changes that would show (level WARNING, k_max 3): a YAML syntax
    # error, an invalid value, an unknown key. Each is refused whole, and every running
    # value stays.
    wanted = {"log_level": "WARNING", "clustering": {"k_max": 3}}
    broken = [(wanted, "clustering: [\n", r"not valid YAML"),
              (merge(wanted, {"clustering": {"k_min": 5}}), "", r"clustering\.k_max"),
              (merge(wanted, {"watch": {"quiet_s": -1}}), "", r"watch\.quiet_s"),
              (wanted, "no_such_key: 1\n", r"no_such_key")]
    for overrides, tail, why in broken:
        write(env, overrides, tail)
        line = hup(env, r"ERROR config reload failed, keeping the running config: .*")
        assert re.search(why, line), line
        assert ks_in_force(env) == [2, 3, 4], line
        assert debug_in_force(env), line
        assert env.daemon.alive()

    # The daemon still sorts, with the config it had.
    env.copy(photos()[12:14], "after_")
    env.tree.wait_drained(14, 60, env.daemon)
    env.finish(allowed_errors=("config reload failed",))


@slow
def test_folders_and_model_wait_for_a_restart(env: Env) -> None:
    env.daemon.start(timeout=120)
    env.seed(12)
    inbox2, library2 = env.root / "inbox2", env.root / "library2"
    inbox2.mkdir()
    write(env, {"inbox": "inbox2", "library": "library2", "model": {"batch_size": 4},
                "log_level": "DEBUG", "clustering": {"k_max": 5}})
    line = hup(env, r"WARNING config reload: .* changed; these take effect after a restart")
    assert "inbox, library, model changed" in line, line
    env.daemon.wait_for_log(r"INFO config reloaded from")
    # What may change did (log level, clustering) ...
    assert ks_in_force(env) == [2, 3, 4, 5]
    assert debug_in_force(env)
    # ... the folders did not: the old inbox is still watched, the old library filled.
    (old,) = env.copy([photos()[20]], "old_inbox_")
    env.tree.wait_drained(13, 60, env.daemon)
    assert [p.parent.parent for p in env.tree.where(old.name)] == [env.tree.library]
    assert not library2.exists()

    # After a restart the new inbox is the one watched (library and model back as they were:
    # moving a library is not a reload's business).
    write(env, {"inbox": "inbox2"})
    env.daemon.stop(timeout=60)
    env.daemon.start(timeout=120)
    env.daemon.wait_for_log(rf"INFO watching {re.escape(str(inbox2))} ")
    src = photos()[21]
    dropped = inbox2 / f"new_inbox_{src.name}"
    dropped.write_bytes(src.read_bytes())
    env.ledger.record(dropped, src.read_bytes())
    wait_until(lambda: not dropped.exists() and env.tree.where(dropped.name), 60,
               "the photo in the new inbox to be filed", on_timeout=env.daemon.log_tail)
    env.finish()
