"""The end-to-end tests' shared fixtures: a fresh daemon environment, its log shown after;
and as many as a test asks for, each beside a real sd_notify socket."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from notify_listener import NotifyListener
from reliability_env import Env

MakeNotifiedEnv = Callable[..., tuple[Env, NotifyListener]]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    """Folders, config and a (not yet started) daemon under tmp_path; stopped afterwards."""
    e = Env(tmp_path / "segd")
    yield e
    e.daemon.cleanup()
    print(e.daemon.log_tail(80))


@pytest.fixture
def make_notified_env(tmp_path: Path) -> Iterator[MakeNotifiedEnv]:
    """`make(overrides, extra_env=None)`: a daemon environment (config `overrides`) whose
    NOTIFY_SOCKET is a real datagram socket standing in for systemd. The listener records
    the daemon's log the instant each datagram arrives (`Notification.seen`). Afterwards
    every daemon is stopped and its folders, notifications and log are shown."""
    made: list[tuple[Env, NotifyListener]] = []

    def make(overrides: dict[str, Any], extra_env: dict[str, str] | None = None
             ) -> tuple[Env, NotifyListener]:
        env = Env(tmp_path / f"segd{len(made)}", overrides)
        listener = NotifyListener(on_message=lambda _fields: env.daemon.log())
        env.daemon.extra_env = {**listener.env, **(extra_env or {})}
        made.append((env, listener))
        return env, listener

    yield make
    for env, listener in made:
        env.daemon.cleanup()
        listener.close()
        print(f"\n==== {env.root}: {env.tree.describe()}\n==== notifications\n"
              f"{listener.describe()}")
        print(env.daemon.log_tail(80))
