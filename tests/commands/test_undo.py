"""`segd undo` without a daemon: under the store lock, through the command line."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from small_library import SmallLibrary

from segd.commands.undo import undo_command
from segd.config import Config
from segd.state.lock import acquire_state_lock


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[SmallLibrary]:
    world = SmallLibrary.pets(tmp_path)
    yield world
    world.store.close()


def segd(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    path = config.state_dir.parent / "config.yaml"
    path.write_text(yaml.safe_dump({
        "inbox": str(config.inbox), "library": str(config.library),
        "quarantine": str(config.quarantine), "state_dir": str(config.state_dir),
        "allow_root": True, "model": {"gpu": "off"}}))
    return subprocess.run([sys.executable, "-m", "segd", *args, "--config", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_segd_undo_puts_the_last_refit_back(lib: SmallLibrary) -> None:
    before = lib.picture()
    lib.refit()
    done = segd(lib.config, "undo")
    assert done.returncode == 0, done.stderr
    assert "5 file(s) moved back" in done.stdout and "panda" in done.stdout
    assert lib.picture() == before
    again = segd(lib.config, "undo")
    assert again.returncode == 1 and "already been undone" in again.stdout


def test_segd_undo_says_why_it_refuses(lib: SmallLibrary, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    refit_id = lib.refit()
    moved = lib.store.refit_moves(refit_id)[0]
    moved.dst.write_bytes(b"retouched")
    after = lib.picture()
    assert undo_command(lib.config, allow_root=True) == 1
    out = capsys.readouterr().out
    assert "nothing was undone" in out and "bytes changed" in out and moved.dst.name in out
    assert lib.picture() == after


def test_segd_undo_touches_nothing_while_another_process_holds_the_store(
        lib: SmallLibrary) -> None:
    lib.refit()
    after = lib.picture()
    with acquire_state_lock(lib.config.lock_path, "sort"):
        done = segd(lib.config, "undo")
    assert done.returncode == 1 and "sort" in done.stderr, done.stderr
    assert lib.picture() == after


def test_segd_undo_without_a_store(tmp_path: Path) -> None:
    config = Config(inbox=tmp_path / "i", library=tmp_path / "l", quarantine=tmp_path / "q",
                    state_dir=tmp_path / "s")
    done = segd(config, "undo")
    assert done.returncode == 1 and "nothing to undo" in done.stdout
