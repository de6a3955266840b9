"""One crash state, checked: its tree put on disk, segd's start-up recovery run on it, and
the invariant (tests/support/invariant.py) checked on what recovery leaves.

Recovery runs in this process by default, the calls `segd run` makes before it watches
(service/daemon.py `run_daemon`: `recover_moves`, then `reconcile`); `daemon=True` starts
the real `segd run` on the tree, lets its first scan empty the inbox (SETTLE_S at most)
and stops it (seconds per state instead of milliseconds: for confirming what the fast
path finds).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from daemon_harness import DaemonProcess, wait_until
from invariant import Dropped, Folders, InvariantError, check_invariant

from crashsim.fsmodel import Image
from segd.config import parse_config_file
from segd.state.mover import recover_moves
from segd.state.reconcile import filing_after_move, reconcile
from segd.state.store import open_store

SETTLE_S = 15.0  # how long the real daemon is given to empty the inbox before it is stopped


@dataclass(frozen=True)
class Outcome:
    ok: bool
    detail: str = ""  # the invariant's report, or what recovery raised
    recovered: int = 0  # journaled moves recovery settled


class Checker:
    """Checks states one after another in the tree of one config (the store's paths are
    absolute, so every state is put back at the place it was recorded)."""

    def __init__(self, config_path: Path, dropped: list[Dropped], folders: tuple[str, ...],
                 daemon: bool = False) -> None:
        self.config_path = config_path
        self.config = parse_config_file(config_path)
        self.root = config_path.parent
        self.folders = Folders.from_config_file(config_path)
        self.dropped = dropped
        self.top = folders
        self.daemon = daemon

    def put(self, img: Image, inodes: Mapping[int, Path] | None = None) -> None:
        for name in self.top:
            shutil.rmtree(self.root / name, ignore_errors=True)
        img.materialize(self.root, inodes)

    def check(self, img: Image, inodes: Mapping[int, Path] | None = None) -> Outcome:
        """`inodes`: the recording's kept inodes (`Image.materialize`)."""
        self.put(img, inodes)
        try:
            recovered = self._run_daemon() if self.daemon else self._recover()
        except Exception as exc:  # any failure to recover is a finding, not a crash here
            return Outcome(False, f"recovery raised {type(exc).__name__}: {exc}")
        try:
            check_invariant(self.dropped, self.folders)
        except InvariantError as exc:
            return Outcome(False, str(exc), recovered)
        return Outcome(True, "", recovered)

    def _recover(self) -> int:
        quiet = logging.getLogger("segd")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        store = open_store(self.config.db_path)
        try:
            recovered = recover_moves(
                store, lambda move, image: filing_after_move(store, self.config, move, image))
            reconcile(store, self.config)
        finally:
            store.close()
            quiet.setLevel(level)
        return recovered

    def _run_daemon(self) -> int:
        daemon = DaemonProcess(self.config_path)
        inbox = self.folders.inbox
        try:
            daemon.start(timeout=120)
            # Its first scan too: what is in the inbox is filed (or waits for a first fit).
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not any(inbox.iterdir()), SETTLE_S, "an empty inbox")
            daemon.stop(timeout=60)
        finally:
            daemon.cleanup()
        return daemon.log().count("recovered interrupted move")
