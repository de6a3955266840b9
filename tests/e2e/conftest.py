"""The end-to-end tests' shared fixture: a fresh daemon environment, its log shown after."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_env import Env


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    """Folders, config and a (not yet started) daemon under tmp_path; stopped afterwards."""
    e = Env(tmp_path / "segd")
    yield e
    e.daemon.cleanup()
    print(e.daemon.log_tail(80))
