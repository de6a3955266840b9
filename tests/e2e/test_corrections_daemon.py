"""End to end: the user's moves are ground truth, with the real `segd run`.

A user works in the library with a file manager while segd is stopped (or running): moves
photos between cluster folders, makes a folder of their own, renames one, empties one into
another, deletes one. Every one of those survives the next start, a refit (the daemon's own
and a forced replacement) and another restart; `segd undo` puts a refit back byte for
byte, or refuses and touches nothing. Every test ends with `check_invariant`: nothing is
lost, duplicated or overwritten, and the store agrees with the disk.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, Tree, copy_photos, photos, segd_cli, write_config
from invariant import DropLedger, check_invariant

from segd.state.store import open_store

QUIET: dict[str, Any] = {"clustering": {"refit_growth": 0, "refit_interval_s": 0}}


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = write_config(root, QUIET)
        self.tree = Tree(self.config)
        self.daemon = DaemonProcess(self.config)
        self.ledger = DropLedger()

    @property
    def library(self) -> Path:
        return self.tree.library

    def seed(self) -> None:
        copy_photos(photos(), self.tree.inbox, "seed_", self.ledger)
        self.tree.wait_drained(40, 180, self.daemon)

    def store_view(self) -> StoreView:
        store = open_store(self.tree.folders.db, readonly=True)
        try:
            with store.snapshot():
                rows = {r.path: r for r in store.iter_images()}
                clusters = {c.id: c for c in store.clusters(active_only=False)}
        finally:
            store.close()
        return StoreView(rows, clusters)

    def folders(self) -> dict[str, list[Path]]:
        """Cluster folder name -> its files, largest folder first."""
        out = {p.name: sorted(f for f in p.iterdir() if f.is_file())
               for p in self.library.iterdir() if p.is_dir()}
        return dict(sorted(out.items(), key=lambda kv: (-len(kv[1]), kv[0])))

    def picture(self) -> dict[str, Any]:
        """Placement, byte for byte: every library file (inode, sha256), the clusters."""
        files = {str(p.relative_to(self.library)): (os.lstat(p).st_ino, _sha(p))
                 for p in sorted(self.library.rglob("*")) if p.is_file()}
        view = self.store_view()
        clusters = sorted((c.id, c.folder, c.active, c.origin, c.centroid.tobytes())
                          for c in view.clusters.values() if c.active)
        rows = sorted((str(r.path), r.state, r.cluster_id, r.pinned)
                      for r in view.rows.values())
        return {"files": files, "clusters": clusters, "rows": rows}

    def cli(self, *args: str) -> tuple[int, str]:
        done = segd_cli(self.config, *args, timeout=300)
        return done.returncode, done.stdout + done.stderr

    def restart(self) -> None:
        self.daemon.stop()
        self.daemon.start()

    def finish(self, dropped: Any = None) -> None:
        if self.daemon.alive():
            self.daemon.stop()
        check_invariant(self.ledger if dropped is None else dropped, self.tree.folders)
        errors = self.daemon.errors_in_log()
        assert not errors, "errors in the daemon log:\n" + "\n".join(errors)
        assert "no longer on disk" not in self.daemon.all_logs()


@dataclass
class StoreView:
    rows: dict[Path, Any]
    clusters: dict[int, Any]

    def row(self, path: Path) -> Any:
        assert path in self.rows, f"{path} has no row"
        return self.rows[path]

    def cluster_named(self, folder: str) -> Any:
        found = [c for c in self.clusters.values() if c.folder == folder]
        assert len(found) == 1, f"no one cluster named {folder}: {found}"
        return found[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path / "segd")
    yield e
    e.daemon.cleanup()
    print(f"\n==== {e.root}: {e.tree.describe()}")
    print(e.daemon.log_tail(80))


@dataclass
class Day:
    """What the user did, and what must hold after every refit and restart."""

    pinned: dict[Path, str]  # file moved into another cluster's folder -> that folder
    mine: list[Path]  # the files of the user's own folder
    renamed: str  # a cluster folder's new name
    renamed_id: int
    merged_id: int  # the cluster whose folder was emptied into another
    merged_folder: str


def users_day(env: Env) -> Day:
    """With segd stopped: move, make a folder (with a photo from outside), rename, merge."""
    view = env.store_view()
    folders = env.folders()
    assert len(folders) >= 4, f"the first fit made too few clusters to work with: {folders}"
    a, b, c, d = list(folders)[:4]
    lib = env.library
    pinned = {}
    for f in folders[a][:2]:
        os.rename(f, lib / b / f.name)
        pinned[lib / b / f.name] = b
    (lib / "mine").mkdir()
    mine = []
    for f in folders[a][2:4] + folders[c][:1]:
        os.rename(f, lib / "mine" / f.name)
        mine.append(lib / "mine" / f.name)
    # A photo from outside: bytes segd has never seen (a JPEG decodes the same with a tail).
    outside = lib / "mine" / "from_camera.jpg"
    outside.write_bytes(photos()[0].read_bytes() + b"\0from the camera")
    env.ledger.record(outside)
    mine.append(outside)
    renamed_id = view.cluster_named(c).id
    os.rename(lib / c, lib / "holidays")
    for f in folders[d]:
        os.rename(f, lib / b / f.name)
        pinned[lib / b / f.name] = b
    merged = view.cluster_named(d)
    return Day(pinned, mine, "holidays", renamed_id, merged.id, d)


def check_day(env: Env, day: Day, *, rename_kept: bool = True) -> None:
    view = env.store_view()
    for path, folder in day.pinned.items():
        assert path.is_file(), f"{path} was moved after the user placed it"
        row = view.row(path)
        assert row.pinned and view.clusters[row.cluster_id].folder == folder, row
    mine = view.cluster_named("mine")
    assert mine.active and mine.origin == "user"
    for path in day.mine:
        assert path.is_file(), f"{path} left the user's folder"
        row = view.row(path)
        assert row.pinned and row.cluster_id == mine.id, row
    merged = view.clusters[day.merged_id]
    assert not merged.active and not (env.library / day.merged_folder).exists()
    renamed = view.clusters[day.renamed_id]
    if rename_kept or renamed.active:
        assert renamed.active and renamed.folder == day.renamed
        assert (env.library / day.renamed).is_dir()


def test_every_correction_survives_a_refit_and_a_restart(env: Env) -> None:
    env.daemon.start()
    env.seed()
    env.daemon.stop()
    day = users_day(env)

    env.daemon.start()  # start-up reconciliation follows the day
    log = env.daemon.log()
    assert "gone from the library" not in log, env.daemon.log_tail()
    assert "your folder(s) mine became clusters" in log
    assert "1 photo(s) you added embedded where they lie" in log
    check_day(env, day)

    rc, out = env.cli("explain", str(next(iter(day.pinned))))
    assert rc == 0 and "pinned: yes, moved by you from" in out, out
    assert "runner-up:" in out

    rc, out = env.cli("refit")  # the daemon's own kind of refit
    assert rc == 0 and "asked the running daemon" in out, out
    check_day(env, day)
    env.restart()
    check_day(env, day)

    rc, out = env.cli("refit", "--k", "2")  # a replacement: pins and the user's folder hold
    assert rc == 0, out
    check_day(env, day, rename_kept=False)
    assert not any((env.library / name).exists() for name in (day.merged_folder,))
    env.restart()
    check_day(env, day, rename_kept=False)
    env.finish()


def test_a_deleted_folder_is_followed_and_only_gone_files_are_forgotten(env: Env) -> None:
    env.daemon.start()
    env.seed()
    env.daemon.stop()
    folders = env.folders()
    names = list(folders)
    gone, h, i = names[0], names[1], names[2]
    gone_id = env.store_view().cluster_named(gone).id
    files = folders[gone]
    deleted = files[0]
    deleted.unlink()  # truly gone
    for n, f in enumerate(files[1:]):
        os.rename(f, env.library / (h if n % 2 else i) / f.name)
    (env.library / gone).rmdir()

    env.daemon.start()
    log = env.daemon.log()
    assert "1 file(s) gone from the library forgotten" in log, env.daemon.log_tail()
    view = env.store_view()
    assert not view.clusters[gone_id].active
    assert not (env.library / gone).exists()
    for n, f in enumerate(files[1:]):
        row = view.row(env.library / (h if n % 2 else i) / f.name)
        assert row.pinned
    assert sum(1 for r in view.rows.values() if r.state == "sorted") == 39
    rc, out = env.cli("refit")
    assert rc == 0, out
    assert not (env.library / gone).exists()
    env.finish([d for d in env.ledger if d.name != deleted.name])


def test_undo_restores_placement_byte_for_byte_or_refuses(env: Env) -> None:
    env.daemon.start()
    env.seed()
    before = env.picture()
    rc, out = env.cli("refit", "--k", "2")
    assert rc == 0, out
    after_refit = env.picture()
    assert after_refit["files"] != before["files"], "the forced refit moved nothing"

    rc, out = env.cli("undo")
    assert rc == 0 and "asked the running daemon" in out and "moved back" in out, out
    assert env.picture() == before
    rc, out = env.cli("undo")
    assert rc == 1 and "already been undone" in out, out

    # After an arrival into a folder the refit filled, undo would not restore the past.
    rc, out = env.cli("refit", "--k", "2")
    assert rc == 0, out
    copy_photos(photos()[:1], env.tree.inbox, "late_", env.ledger)
    env.tree.wait_drained(41, 120, env.daemon)
    unchanged = env.picture()
    rc, out = env.cli("undo")
    assert rc == 1 and "since the refit" in out and "late_" in out, out
    assert env.picture() == unchanged
    env.restart()
    assert env.picture() == unchanged
    env.finish()


def test_undo_without_a_daemon_and_across_a_restart(env: Env) -> None:
    env.daemon.start()
    env.seed()
    before = env.picture()
    rc, out = env.cli("refit", "--k", "2")
    assert rc == 0, out
    env.daemon.stop()
    rc, out = env.cli("undo")  # no daemon: under the store lock
    assert rc == 0 and "moved back" in out and "asked the running daemon" not in out, out
    assert env.picture() == before
    env.daemon.start()
    assert env.picture() == before  # the start-up reconciliation finds nothing to change
    env.finish()



def test_the_users_day_while_the_daemon_runs_then_a_forced_refit(env: Env) -> None:
    """The reported day: the user works while segd runs, then asks for a refit that picks
    a small k. The refit follows the day before it re-files, and moves none of it."""
    env.daemon.start()
    env.seed()
    day = users_day(env)
    rc, out = env.cli("refit", "--k", "2")
    assert rc == 0 and "asked the running daemon" in out, out
    log = env.daemon.log()
    assert "gone from the library" not in log, env.daemon.log_tail()
    check_day(env, day, rename_kept=False)
    env.restart()
    check_day(env, day, rename_kept=False)
    env.finish()
