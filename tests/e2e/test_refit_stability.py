"""End to end: a burst into a fresh inbox is fitted once, and later refits reshuffle nobody.

The real `segd run` (tests/support/daemon_harness.py) with the 40 test photos: 25 dropped
as one burst (5 at a time, 0.7 s apart, as a slow copy delivers them), then the rest 5 at a
time. Refits are read from the daemon's log (one summary line
each); where each photo is, from the library itself.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from daemon_harness import DaemonProcess, Tree, copy_photos, photos, segd_cli, write_config
from invariant import DropLedger, check_invariant

SETTLE_S = 3.0
PACE_S = 0.7  # between groups of the burst: well inside the settle time
REFIT = re.compile(r"refit \((?P<trigger>[^)]*)\): n=(?P<n>\d+)")


def refits(log: str) -> list[tuple[str, int, int]]:
    """(trigger, n, files re-filed) of every refit the daemon applied or tried."""
    out = []
    for line in log.splitlines():
        m = REFIT.search(line)
        if m:
            moved = re.search(r"\bmoved=(\d+)", line)
            out.append((m["trigger"], int(m["n"]), int(moved[1]) if moved else 0))
    return out


def places(tree: Tree) -> dict[str, str]:
    return {p.name: p.parent.name for p in tree.library_files()}


def test_a_burst_is_fitted_once_and_later_refits_move_nobody(tmp_path: Path) -> None:
    config = write_config(tmp_path / "segd", {"clustering": {"settle_s": SETTLE_S}})
    tree = Tree(config)
    daemon = DaemonProcess(config)
    ledger = DropLedger()
    by_class: dict[str, list[Path]] = {}
    for photo in photos():
        by_class.setdefault(photo.parent.name, []).append(photo)
    burst = [p for group in by_class.values() for p in group[:5]]  # 25 photos, 5 classes
    rest = [p for group in by_class.values() for p in group[5:]]
    try:
        daemon.start()
        for i in range(0, len(burst), 5):  # a burst as a copy makes one: files keep coming
            copy_photos(burst[i:i + 5], tree.inbox, "burst_", ledger)
            time.sleep(PACE_S)
        tree.wait_drained(len(burst), 180, daemon)
        daemon.wait_for_log(r"refit \(first fit\)")
        # min_images is 10: without the settle wait the first fit took the first 10-20.
        assert [(t, n) for t, n, _ in refits(daemon.log())] == [("first fit", 25)], \
            daemon.log_tail()
        for i in range(3):  # then a trickle, 5 at a time
            copy_photos(rest[i * 5:(i + 1) * 5], tree.inbox, "more_", ledger)
            tree.wait_drained(len(burst) + 5 * (i + 1), 120, daemon)
        automatic = refits(daemon.log())
        assert len(automatic) <= 2, automatic  # the first fit and at most one growth refit
        # Kept clusters move nobody.
        for line in daemon.log().splitlines():
            if "kept the clusters" in line:
                assert "moved=0 files" in line, line

        # Two refits on demand over the same photos: the second finds what the first
        # applied, keeps it, and moves nothing.
        for _ in range(2):
            before = places(tree)
            done = segd_cli(config, "refit", timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
            assert done.stdout.count("refit (on demand)") == 1, done.stdout  # printed once
        assert "kept the clusters" in done.stdout and "moved=0 files" in done.stdout, \
            done.stdout
        assert places(tree) == before
        daemon.stop()
        check_invariant(ledger, tree.folders)
    finally:
        daemon.cleanup()
