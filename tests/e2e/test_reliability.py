"""Reliability and security of the real daemon under real faults.

Each test runs `segd run` as a subprocess and ends with `check_invariant`
(tests/support/invariant.py), including its "nothing outside segd's folders changed" part
(a sentinel folder beside them).
Faults are real: kill -9, a tmpfs library that fills up or is remounted read-only, a
library on another filesystem than the inbox (/dev/shm), a second process holding the
store's lock, the inbox deleted under the daemon, a daemon running as an unprivileged user
meeting a file it may not read, a cluster folder replaced by a symlink. Only what the
machine cannot do is skipped, with the reason (CI runs as root and can do all of it).

tests/e2e/test_bad_input_daemon.py drops every kind of bad input through the real daemon.
docs/reliability.md has the table of faults, what segd does and the figures.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import photos, segd_cli, wait_until, write_config
from invariant import Dropped, Sentinel, canonical_name, sha256_file
from reliability_env import (
    Env,
    chown_tree,
    fill_up,
    remount,
    shared_root,
    tmpfs,
    unprivileged_user,
)

from segd.core.errors import SegdError
from segd.core.library import safe_folder
from segd.service import control
from segd.state.reconcile import resolve_cluster_folder
from segd.state.store import StoreError, open_store

slow = pytest.mark.slow

MOVE_ON_REFIT: dict[str, Any] = {"clustering": {"on_refit": "move", "refit_growth": 0}}
MAX_KILL_ROUNDS = 12  # the 5 planned, then at most 7 more aimed at a refit's moves


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    envs: list[Env] = []

    def make(overrides: dict[str, Any] | None = None, root: Path | None = None,
             **kwargs: Any) -> Env:
        env = Env(root or tmp_path / f"segd{len(envs)}", overrides, **kwargs)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.daemon.cleanup()
        print(f"\n==== {env.root}: {env.tree.describe()}")
        print(env.daemon.log_tail(80))


def _drop_thread(env: Env, n: int, prefix: str, pace_s: float = 0.0) -> threading.Thread:
    ph = photos()

    def run() -> None:
        for i in range(n):
            env.copy([ph[i % len(ph)]], f"{prefix}{i:03d}_")
            if pace_s:
                time.sleep(pace_s)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _refit_client(env: Env, k: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "segd", "refit", "--k", str(k), "--config", str(env.config)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=env.root)


# ---- kill -9 during bursts and during refits that move files


def kill_round(env: Env, rng: random.Random, round_no: int, k: int, burst: int = 30,
               max_delay: float = 3.0, aim_refit: bool | None = None) -> dict[str, Any]:
    """One round: start (recovering what the last kill left), drop a burst, ask for a refit
    to k clusters (on_refit: move, so files move between cluster folders), kill -9, then
    restart, drain, stop and check the invariant.

    Rounds aiming at the refit (even ones unless told): the burst is filed first, then
    `segd refit --k K` is asked for and the kill comes a random 0-40 ms after its first
    journaled move is seen in the store. The others kill a random 0.3-`max_delay` s into
    the burst, with the refit asked for at the same time. Every move the kill left open
    in the journal must be recovered, one log line each, at the restart. Returns what the
    round saw."""
    env.daemon.start(timeout=120)
    dropper = _drop_thread(env, burst, f"r{round_no}_")
    if aim_refit is None:
        aim_refit = round_no % 2 == 0
    if aim_refit:
        dropper.join(60)
        env.tree.wait_drained(len(env.ledger), 240, env.daemon)
        client = _refit_client(env, k)
        wait_until(lambda: env.pending_moves() > 0 or client.poll() is not None, 60,
                   "the refit's first journaled move", interval=0.005)
        delay = rng.uniform(0.0, 0.04)
    else:
        client = _refit_client(env, k)
        delay = rng.uniform(0.3, max_delay)
    time.sleep(delay)
    env.daemon.kill()
    client.kill()
    client.wait(30)
    dropper.join(60)
    killed_log = env.daemon.log()
    refit_done = "refit (on demand" in killed_log
    open_moves = env.pending_moves()
    # Restart: recovery settles the journal, then everything is filed.
    env.daemon.start(timeout=120)
    recovered = env.daemon.log().count("recovered interrupted move")
    assert recovered == open_moves, (
        f"{open_moves} move(s) open at the kill, {recovered} recovered:\n"
        + env.daemon.log_tail())
    env.tree.wait_drained(len(env.ledger), 240, env.daemon)
    env.daemon.stop(timeout=30)
    summary = env.check()
    return {"aim": "refit" if aim_refit else "burst", "delay": round(delay, 2), "k": k,
            "refit_completed_before_kill": refit_done, "open_moves_at_kill": open_moves,
            "moves_recovered": recovered, "files": summary.dropped}


@slow
def test_kill9_during_bursts_and_moving_refits(make_env: Callable[..., Env]) -> None:
    """5 seeded rounds: a burst of 30 and `segd refit --k N` (on_refit: move, a different k
    each round, so many files move between cluster folders), kill -9 at a random instant,
    restart, drain, invariant after every round."""
    env = make_env(MOVE_ON_REFIT)
    env.daemon.start(timeout=120)
    env.seed(40)
    env.daemon.stop(timeout=30)
    rng = random.Random(20240607)
    ks = [2, 5, 3, 6, 2]
    rounds = [kill_round(env, rng, i, k) for i, k in enumerate(ks)]
    # The scenario is a kill inside a journaled move: until one lands there (a race the
    # test cannot force), more rounds aim at a refit's moves, a bounded number of them.
    while not any(r["open_moves_at_kill"] for r in rounds) and len(rounds) < MAX_KILL_ROUNDS:
        rounds.append(kill_round(env, rng, len(rounds), ks[len(rounds) % len(ks)],
                                 aim_refit=True))
    for r in rounds:
        print(f"[kill round] {r}")
    assert any(not r["refit_completed_before_kill"] for r in rounds), rounds
    assert sum(r["open_moves_at_kill"] for r in rounds) > 0, (
        f"no kill in {len(rounds)} rounds landed inside a journaled move", rounds)
    assert sum(r["moves_recovered"] for r in rounds) > 0, rounds
    env.daemon.start(timeout=120)
    env.finish()


# ---- inbox and library on different filesystems (the copy path)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    path = Path(tempfile.mkdtemp(prefix="segd-rel-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@slow
def test_library_on_another_filesystem_copy_path_survives_kills(
        shm_dir: Path, make_env: Callable[..., Env]) -> None:
    """Library and quarantine on /dev/shm, inbox and store on the disk: every move is a
    copy + fsync + link + unlink. Bad files go to the quarantine the same way. Two kill -9
    rounds during bursts and moving refits, then the invariant."""
    env = make_env(merge_dirs(MOVE_ON_REFIT, library=str(shm_dir / "library"),
                              quarantine=str(shm_dir / "quarantine")))
    if os.stat(env.tree.inbox).st_dev == os.stat(env.tree.library).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test folders here")
    env.daemon.start(timeout=120)
    env.seed(40)
    env.drop_bytes("bad_text.jpg", b"not an image\n" * 20)
    env.drop_bytes("bad_empty.jpg", b"")
    env.tree.wait_drained(42, 60, env.daemon)
    env.daemon.stop(timeout=30)
    rng = random.Random(7)
    rounds = [kill_round(env, rng, i, k, burst=25) for i, k in enumerate([4, 2])]
    print(f"[cross-fs kill rounds] {rounds}")
    env.daemon.start(timeout=120)
    summary = env.finish()
    assert summary.quarantined == 2
    # Every file really was copied onto the other filesystem.
    assert all(p.stat().st_dev != os.stat(env.tree.inbox).st_dev
               for p in env.tree.library_files())


def merge_dirs(base: dict[str, Any], **dirs: str) -> dict[str, Any]:
    return {**base, **dirs}


# ---- a full and a read-only library (a real small tmpfs)


@slow
def test_library_full_then_read_only(make_env: Callable[..., Env]) -> None:
    """The library is a 4 MiB tmpfs (another filesystem: the copy path). Filled to the last
    byte, new arrivals cannot be filed: they stay in the inbox (no temp file, no open
    journal row, no stray store row), the daemon keeps running, and once space is freed
    they are filed. Then the same with the tmpfs remounted read-only; and a start with a
    read-only library is refused, naming the key."""
    env = make_env({"watch": {"rescan_interval_s": 1.0}})
    with tmpfs(env.tree.library, "4m"):
        env.daemon.start(timeout=120)
        env.seed(40)

        # ---- full
        filler = fill_up(env.tree.library)
        mark = len(env.daemon.log())
        env.copy(photos()[:12], "full_")
        env.daemon.wait_for_log(r"No space left on device", timeout=60, start=mark)
        time.sleep(3)  # a few rescans retry them, and fail again
        assert len(env.tree.inbox_files()) == 12, env.tree.describe()
        assert env.daemon.alive()
        assert env.pending_moves() == 0
        assert not [p for p in env.tree.library.rglob(".segd-tmp-*")]
        filler.unlink()
        env.tree.wait_drained(52, 60, env.daemon)

        # ---- read-only
        remount(env.tree.library, "ro")
        try:
            mark = len(env.daemon.log())
            env.copy(photos()[12:20], "ro_")
            env.daemon.wait_for_log(r"Read-only file system", timeout=60, start=mark)
            time.sleep(2)
            assert len(env.tree.inbox_files()) == 8
            assert env.daemon.alive()
            env.check()
            env.daemon.stop(timeout=30)
            done = segd_cli(env.config, "run", timeout=120)
            assert done.returncode == 1, done.stderr
            assert "library" in done.stderr and "not writable" in done.stderr, done.stderr
        finally:
            remount(env.tree.library, "rw")
        env.daemon.start(timeout=120)
        env.tree.wait_drained(60, 60, env.daemon)
        env.finish()


# ---- the store's lock held by another process


def test_second_writer_refused_naming_the_holder(make_env: Callable[..., Env]) -> None:
    """A second `segd run` on the same state dir refuses and names the running daemon's pid;
    the first keeps going. A `segd run` or `segd refit` while a non-daemon process holds
    the lock refuses the same way."""
    env = make_env()
    env.daemon.start(timeout=120)
    done = segd_cli(env.config, "run", timeout=120)
    assert done.returncode == 1
    assert f"in use by pid {env.daemon.pid} (daemon)" in done.stderr, done.stderr
    assert env.daemon.alive()
    env.copy(photos()[:3], "after_")  # the first daemon still takes arrivals
    wait_until(lambda: _pending_rows(env) >= 3, 60, "the first daemon to take arrivals")
    env.daemon.stop(timeout=30)

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from segd.state.lock import acquire_state_lock; "
         f"l = acquire_state_lock({str(env.folders.state_dir / 'segd.lock')!r}, 'refit'); "
         "print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for args in (("run",), ("refit", "--k", "2")):
            done = segd_cli(env.config, *args, timeout=120)
            assert done.returncode == 1, (args, done.stdout, done.stderr)
            assert f"in use by pid {holder.pid} (refit)" in done.stderr, (args, done.stderr)
    finally:
        holder.kill()
        holder.wait()
    env.daemon.start(timeout=120)
    env.finish()


def _pending_rows(env: Env) -> int:
    if not env.folders.db.exists():
        return 0
    store = open_store(env.folders.db, readonly=True)
    try:
        return store.count_by_state()["pending"]
    finally:
        store.close()


def test_root_refused_without_override(make_env: Callable[..., Env]) -> None:
    """`segd run` as root refuses with the reason; `--allow-root` runs it."""
    if os.geteuid() != 0:
        pytest.skip("only meaningful as root")
    env = make_env({"allow_root": False})
    done = segd_cli(env.config, "run", timeout=60)
    assert done.returncode == 1
    assert "refusing to run the daemon as root" in done.stderr, done.stderr
    assert "--allow-root" in done.stderr
    env.daemon.extra_args = ("--allow-root",)
    env.daemon.start(timeout=120)
    env.copy(photos()[:2], "root_")
    wait_until(lambda: _pending_rows(env) >= 2, 60, "arrivals taken")
    env.finish()


# ---- the inbox deleted (and recreated) under the daemon


@slow
def test_inbox_deleted_while_running(make_env: Callable[..., Env]) -> None:
    env = make_env()
    env.daemon.start(timeout=120)
    env.seed(12)
    shutil.rmtree(env.tree.inbox)
    env.tree.inbox.mkdir()  # `rm -r inbox && mkdir inbox`
    time.sleep(0.5)
    env.copy(photos()[12:17], "recreated_")
    env.tree.wait_drained(17, 60, env.daemon)
    shutil.rmtree(env.tree.inbox)  # deleted and left deleted: the daemon recreates it
    env.daemon.wait_for_log(r"recreat", timeout=30)
    wait_until(env.tree.inbox.is_dir, 30, "the inbox to be recreated")
    env.copy(photos()[17:22], "after_rm_")
    env.tree.wait_drained(22, 60, env.daemon)
    env.finish()


# ---- files that keep growing or vanish while being read


@slow
def test_growing_and_vanishing_files(make_env: Callable[..., Env]) -> None:
    """A file held open and appended to for 4 s is never filed while it grows, and is
    filed whole after it is closed. Files deleted right after being dropped (racing the
    daemon's read and move) are either filed whole or gone: never half, never twice."""
    env = make_env()
    env.daemon.start(timeout=120)
    env.seed(12)
    data = photos()[20].read_bytes()
    grow = env.tree.inbox / "growing.jpg"
    pieces = 20
    size = -(-len(data) // pieces)
    with open(grow, "wb") as fh:
        for i in range(pieces):
            fh.write(data[i * size:(i + 1) * size])
            fh.flush()
            time.sleep(0.2)
            assert grow.exists() and env.tree.where("growing.jpg") == [grow], \
                "filed while still growing"
    env.ledger.record(grow, data)

    deleted: list[tuple[Path, bytes]] = []
    for i, src in enumerate(photos()[21:37]):
        path = env.tree.inbox / f"vanish_{i:02d}.jpg"
        body = src.read_bytes()
        path.write_bytes(body)
        time.sleep(random.Random(i).uniform(0, 0.4))
        try:
            path.unlink()  # the user deletes it again: not "dropped" any more...
            deleted.append((path, body))
        except FileNotFoundError:
            env.ledger.record(path, body)  # the daemon was faster: it must be filed
    env.tree.wait_drained(len(env.ledger), 60, env.daemon)
    time.sleep(1.5)
    env.daemon.stop(timeout=30)
    # ...unless the delete hit the inbox name while the daemon's move had already linked
    # the file into the library (link, fsync, unlink): then it was taken first, and it
    # must be there whole, once.
    taken = 0
    for path, body in deleted:
        found = env.tree.where(path.name)
        if found:
            assert len(found) == 1 and found[0].read_bytes() == body, found
            env.ledger.record(path, body)
            taken += 1
    summary = env.finish(stop=False)
    print(f"[vanish] {len(deleted) - taken} deleted before filing, {16 - len(deleted)} filed "
          f"first, {taken} deleted while being filed (kept, whole)")
    assert summary.quarantined == 0


# ---- an unprivileged daemon: unreadable files, modes and owners, read-only folders


@slow
def test_unprivileged_daemon_permissions() -> None:
    """The daemon runs as `nobody` (tests run as root, which reads everything). A 0000 file
    dropped by root is quarantined with "permission denied" and the daemon keeps going;
    its store, lock and control socket are 0600 and owned by the service user; a library
    made read-only (chmod 0555, which binds nobody) keeps arrivals in the inbox until it is
    writable again."""
    uid, gid = unprivileged_user()
    with shared_root("segd-nobody-") as base:
        root = base / "segd"
        config = write_config(root)
        for name in ("inbox", "library", "quarantine", "state"):
            (root / name).mkdir(parents=True, exist_ok=True)
        env = Env(root, run_as=(uid, gid))
        chown_tree(root / "inbox", uid, gid)
        for name in ("library", "quarantine", "state"):
            chown_tree(root / name, uid, gid)
        assert config == env.config
        try:
            env.daemon.start(timeout=120)
            env.seed(12)
            secret = env.drop_bytes("secret.jpg", photos()[30].read_bytes())
            os.chmod(secret, 0)
            env.copy([photos()[31]], "after_secret_")
            env.tree.wait_drained(14, 60, env.daemon)
            q = env.tree.quarantine / "secret.jpg"
            assert q.exists() and stat.S_IMODE(q.lstat().st_mode) == 0
            reasons = (env.tree.quarantine / "reasons.tsv").read_text()
            assert "secret.jpg" in reasons and "permission denied" in reasons, reasons
            assert env.daemon.alive()

            state = env.folders.state_dir
            for path in (state / "segd.db", state / "segd.lock", state / "control.sock"):
                st = path.lstat()
                assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
                assert st.st_uid == uid, (path, st.st_uid)
            for extra in state.glob("segd.db-*"):
                assert stat.S_IMODE(extra.stat().st_mode) == 0o600, extra

            folders = [env.tree.library, *(p for p in env.tree.library.iterdir() if p.is_dir())]
            for folder in folders:
                os.chmod(folder, 0o555)
            try:
                mark = len(env.daemon.log())
                env.copy(photos()[32:36], "readonly_")
                env.daemon.wait_for_log(r"could not be filed: .*Permission denied",
                                        timeout=60, start=mark)
                assert len(env.tree.inbox_files()) == 4 and env.daemon.alive()
            finally:
                for folder in folders:
                    os.chmod(folder, 0o755)
            env.tree.wait_drained(18, 60, env.daemon)
            env.finish()
        finally:
            env.daemon.cleanup()
            print(env.daemon.log_tail(200))


# ---- symlinks and folder names never lead outside the library


@slow
def test_cluster_folder_replaced_by_symlink_receives_nothing(
        make_env: Callable[..., Env], tmp_path: Path) -> None:
    """A user moves a cluster folder away and puts a symlink to it in its place while the
    daemon runs. Photos for that cluster must not land at the link's target: they wait in
    the inbox (a warning says why); every other photo is filed as usual. (No growth
    refits here: one could legitimately re-assign the waiting photos elsewhere.)"""
    env = make_env({"clustering": {"min_images": 10, "k_max": 6, "n_init": 2,
                                   "refit_growth": 0}})
    env.daemon.start(timeout=120)
    env.seed(12)
    folder = max((p for p in env.tree.library.iterdir() if p.is_dir()),
                 key=lambda p: len(list(p.iterdir())))
    elsewhere = tmp_path / "elsewhere"
    moved = {(canonical_name(p.name), sha256_file(p)) for p in folder.iterdir()}
    shutil.move(str(folder), str(elsewhere))
    os.symlink(elsewhere, folder)
    env.ledger.items = [d for d in env.ledger.items if (d.name, d.sha256) not in moved]
    watch = Sentinel.take(elsewhere)
    env.sentinels.append(watch)

    env.copy(photos()[12:40], "later_")
    env.daemon.wait_for_log(r"is a symbolic link", timeout=120)

    def settled() -> bool:
        before = env.tree.counts()
        time.sleep(2.5)
        return env.tree.counts() == before and not _busy(env)

    wait_until(settled, 120, "the daemon to settle")
    assert not watch.changes(), watch.changes()
    waiting = env.tree.inbox_files()
    assert waiting, "expected some photos to wait for the symlinked cluster"
    assert env.daemon.alive()
    # The user puts the real folder back: the waiting photos are filed into it.
    env.sentinels.remove(watch)
    folder.unlink()
    shutil.move(str(elsewhere), str(folder))
    env.ledger.items += [Dropped(*m) for m in moved]
    env.tree.wait_drained(len(env.ledger), 60, env.daemon)
    summary = env.finish()
    print(f"[symlinked folder] {len(waiting)} photos kept in the inbox; {summary.describe()}")


def _busy(env: Env) -> bool:
    """Whether the running daemon still has work: asked over its control socket. Any
    failure to ask is the test's failure (it must not read as "idle")."""
    answer = control.request(env.folders.state_dir / "control.sock", {"cmd": "status"},
                             timeout=30)
    assert answer["ok"], answer
    s = answer["status"]
    return bool(s["queue_depth"] or s["in_flight"] or s["refit_running"])


BAD_FOLDER_NAMES = ["..", ".", "../x", "a/b", "/etc", "/tmp/elsewhere", "", "x\0y",
                    "../../../../etc/cron.d"]


@pytest.mark.parametrize("name", BAD_FOLDER_NAMES)
def test_folder_names_cannot_escape_the_library(tmp_path: Path, name: str) -> None:
    """Neither the store nor `safe_folder` accepts a cluster folder name that is not a plain
    name inside the library."""
    library = tmp_path / "library"
    with pytest.raises(SegdError):
        safe_folder(library, name)
    store = open_store(tmp_path / "segd.db")
    try:
        store.bind_model("0" * 64, 4)
        with pytest.raises(StoreError):
            store.add_cluster(name, _vec())
        cid = store.add_cluster("cluster-01", _vec())
        with pytest.raises(StoreError):
            store.update_cluster(cid, folder=name)
        if name not in ("", ".", "x\0y"):  # Path() drops these itself
            with pytest.raises(StoreError):
                store.rename_cluster_folder(cid, library / "cluster-01", library / name)
    finally:
        store.close()


def test_tampered_store_folder_is_refused(tmp_path: Path) -> None:
    """A folder name written into the database behind the store's back (`../escape`) is
    refused when the daemon resolves it: nothing is created outside the library."""
    import sqlite3

    library = tmp_path / "library"
    library.mkdir()
    db = tmp_path / "segd.db"
    store = open_store(db)
    store.bind_model("0" * 64, 4)
    cid = store.add_cluster("cluster-01", _vec())
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE clusters SET folder = '../escape' WHERE id = ?", (cid,))
    conn.commit()
    conn.close()
    store = open_store(db)
    try:
        with pytest.raises(SegdError):
            resolve_cluster_folder(store, library, cid)
    finally:
        store.close()
    assert not (tmp_path / "escape").exists()


def _vec() -> Any:
    import numpy as np

    return np.ones(4, dtype=np.float32) / 2

