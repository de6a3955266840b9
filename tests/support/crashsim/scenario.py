"""The recorded runs: the real segd under strace, on a real folder tree.

1. seed (not recorded): `segd run` files `seed` photos (the first fit), then stops;
2. burst: `segd run` under strace starts with `burst` new photos and one file that is not
   an image in the inbox, files them all (one network batch, journaled together; the bad
   file through the quarantine), then stops on SIGTERM;
3. refit: `segd refit --k K` under strace (no daemon running, clustering.on_refit: move),
   a K the store was not fitted with, so new cluster folders are made and files move;
4. recovery: the burst's `kill -9` state with the most journaled moves open (every link
   made, no source unlinked yet) is put on disk, and `segd run` under strace settles it
   at start-up, watches, and stops.

Before each recording the tree is synced and read back (`Image.from_disk`): that is the
recording's durable starting point. After it, the model's final tree must equal the disk
byte for byte, or the recording is refused (`ModelMismatch`): the replay reproduced
every change the program made, or the states built from it would mean nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon_harness import (
    DaemonProcess,
    Tree,
    copy_photos,
    photos,
    segd_cli,
    wait_until,
    write_config,
)
from invariant import DropLedger, Dropped

from crashsim import strace
from crashsim.check import Checker
from crashsim.fsmodel import Image, Link, Sync, Unlink
from crashsim.replay import Recording, replay

FOLDERS = ("inbox", "library", "quarantine", "state")
# Not modelled: SQLite's -shm is a memory map rebuilt from the WAL by the first connection
# after a crash (never read for recovery); the control socket is not a file of data.
SKIP = ("segd.db-shm", "control.sock")
OVERRIDES: dict[str, Any] = {"clustering": {"k": 2, "on_refit": "move", "refit_growth": 0,
                                            "settle_s": 0.5}}


class ModelMismatch(AssertionError):
    """The replayed operations do not reproduce the tree the program left."""


class TracedDaemon(DaemonProcess):
    """`segd run` under strace; signals go to the daemon (strace blocks them)."""

    def __init__(self, config: Path, trace: Path) -> None:
        super().__init__(config)
        self.trace = trace
        self._tracee: int | None = None

    def start(self, wait: bool = True, timeout: float = 120) -> TracedDaemon:
        log = self.root / f"daemon-{len(self.logs) + 1}.log"
        self.logs.append(log)
        self._log_fh = open(log, "wb")  # noqa: SIM115 - closed in _reap
        cmd = [sys.executable, "-m", "segd", "run", "--config", str(self.config)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "SEGD_CONFIG", "LISTEN_FDS"):
            env.pop(key, None)
        self.proc = strace.run_traced(cmd, self.trace, stdin=subprocess.DEVNULL,
                                      stdout=self._log_fh, stderr=subprocess.STDOUT, env=env,
                                      cwd=self.root)
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        if self._tracee is None:
            assert self.proc is not None
            self._tracee = wait_until(lambda: strace.tracee_pid(self.proc.pid), 30,
                                      "the traced daemon's pid")
        return self._tracee

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 60.0) -> float:
        assert self.proc is not None and self.alive(), "not running"
        started = time.monotonic()
        self.signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"traced segd run did not stop:\n{self.log_tail()}") from None
        self._reap()
        assert rc == 0, f"traced segd run exited with {rc}:\n{self.log_tail()}"
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            tracee = strace.tracee_pid(self.proc.pid)
            if tracee is not None:
                os.kill(tracee, signal.SIGKILL)
            self.proc.wait(30)
        self._reap()


@dataclass
class Scenario:
    config: Path
    ledger: DropLedger
    recordings: dict[str, Recording] = field(default_factory=dict)
    inodes: dict[str, dict[int, Path]] = field(default_factory=dict)  # see keep_inodes
    dropped: dict[str, list[Dropped]] = field(default_factory=dict)  # the ledger then

    def checker(self, name: str, daemon: bool = False) -> Checker:
        """Checks the states of recording `name` against the files dropped by then."""
        return Checker(self.config, self.dropped[name], FOLDERS, daemon=daemon)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.config.parent


def durable_start(root: Path) -> Image:
    os.sync()
    return Image.from_disk(root, FOLDERS, SKIP)


def finish(root: Path, trace: Path, initial: Image) -> Recording:
    """Replay the trace over `initial`; refuse it unless it reproduces the disk."""
    rec = replay(strace.parse_log(trace), os.fsencode(root), initial, FOLDERS, SKIP)
    on_disk = Image.from_disk(root, FOLDERS, SKIP)
    if rec.final.digest() != on_disk.digest():
        raise ModelMismatch(f"the replay of {trace} does not reproduce {root}:\n"
                            + "\n".join(diff(rec.final, on_disk)))
    return rec


def diff(model: Image, disk: Image) -> list[str]:
    """What differs between two trees, name by name."""
    def listing(img: Image) -> dict[bytes, tuple[str, str]]:
        return {name: (img.inodes[ino].kind, hashlib.sha256(img.inodes[ino].data).hexdigest())
                for ino, names in img.paths().items() for name in names}

    a, b = listing(model), listing(disk)
    lines = [f"only in the model: {os.fsdecode(n)}" for n in sorted(a.keys() - b.keys())]
    lines += [f"only on disk: {os.fsdecode(n)}" for n in sorted(b.keys() - a.keys())]
    lines += [f"differs: {os.fsdecode(n)}" for n in sorted(a.keys() & b.keys()) if a[n] != b[n]]
    return lines or ["(the same names and bytes; the hard links differ)"]


def record_daemon(config: Path, trace: Path,
                  drive: Callable[[TracedDaemon], None]) -> Recording:
    """`segd run` under strace from a durable start: `drive` it, then SIGTERM."""
    initial = durable_start(config.parent)
    daemon = TracedDaemon(config, trace)
    try:
        daemon.start()
        drive(daemon)
        daemon.stop()
    finally:
        daemon.cleanup()
    return finish(config.parent, trace, initial)


def record_command(config: Path, trace: Path, *args: str) -> Recording:
    """`segd ARGS` under strace, to completion, from a durable start."""
    initial = durable_start(config.parent)
    cmd = [*strace.command(trace), sys.executable, "-m", "segd", *args, "--config",
           str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=config.parent)
    if done.returncode != 0:
        raise AssertionError(f"segd {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
    return finish(config.parent, trace, initial)


def most_open_moves(rec: Recording) -> int:
    """The first prefix with the most files linked out of the inbox and not yet unlinked
    from it (journal rows open: what start-up recovery settles), past the syncs that
    follow: a kill -9 there."""
    inbox = rec.initial.lookup([b"inbox"])
    best, best_at, open_now = 0, None, 0
    for i, op in enumerate(rec.ops):
        if isinstance(op, Link) and op.dir != inbox:
            open_now += 1
        elif isinstance(op, Unlink) and op.dir == inbox:
            open_now -= 1
        if open_now > best:
            best, best_at = open_now, i + 1
    if best_at is None:
        raise AssertionError("the recording never links a file out of the inbox")
    while best_at < len(rec.ops) and isinstance(rec.ops[best_at], Sync):
        best_at += 1
    return best_at


def keep_inodes(root: Path, rec: Recording, stash: Path) -> dict[int, Path]:
    """A hard link to every file the recording left, by model inode (see materialize)."""
    stash.mkdir(parents=True, exist_ok=True)
    kept: dict[int, Path] = {}
    for ino, names in rec.final.paths().items():
        if rec.final.inodes[ino].kind == "file":
            kept[ino] = stash / str(ino)
            os.link(root / os.fsdecode(names[0]), kept[ino])
    return kept


def work_root(fallback: Path) -> Path:
    """A folder on tmpfs when there is one (the checks sync nothing real then: the model
    decides what a crash keeps, not the disk), else `fallback`."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 256 << 20:
        return Path(tempfile.mkdtemp(prefix="segd-crash-", dir=shm))
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def build(root: Path, traces: Path, *, seed: int = 10, burst: int = 10, refit_k: int = 4,
          first_run: bool = True, recovery: bool = True) -> Scenario:
    """Record the first run (or just run it), the burst, the refit and a start-up recovery."""
    if not strace.available():
        raise RuntimeError("strace is not installed")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty: the scenario starts from nothing")
    traces.mkdir(parents=True, exist_ok=True)
    config = write_config(root, OVERRIDES)
    tree = Tree(config)
    tree.library.rmdir()  # the first run makes them
    tree.quarantine.rmdir()
    scen = Scenario(config, DropLedger())
    stash = root / ".crashsim-inodes"
    chosen = photos()
    seeds, arrivals = chosen[0::2][:seed], chosen[1::2][:burst]

    def timed(name: str, record: Callable[[], Recording | None]) -> None:
        started = time.monotonic()
        scen.dropped[name] = list(scen.ledger)
        rec = record()
        if rec is not None:
            scen.recordings[name] = rec
            scen.inodes[name] = keep_inodes(root, rec, stash / name)
        scen.seconds[name] = time.monotonic() - started

    copy_photos(seeds, tree.inbox, "", scen.ledger)
    if first_run:
        timed("first-run", lambda: record_daemon(
            config, traces / "first-run.strace", lambda d: tree.wait_drained(seed, 180, d)))
    else:
        timed("first-run", lambda: _plain_run(config, tree, seed))

    copy_photos(arrivals, tree.inbox, "", scen.ledger)
    bad = tree.inbox / "not-a-photo.jpg"
    bad.write_bytes(b"these bytes are not an image\n" * 40)
    scen.ledger.record(bad)
    filed = seed + burst + 1
    timed("burst", lambda: record_daemon(config, traces / "burst.strace",
                                         lambda d: tree.wait_drained(filed, 180, d)))
    timed("refit", lambda: record_command(config, traces / "refit.strace", "refit", "--k",
                                          str(refit_k)))
    if recovery:
        after_refit = Image.from_disk(root, FOLDERS, SKIP)
        burst_rec = scen.recordings["burst"]
        crash = crash_image(burst_rec, most_open_moves(burst_rec))
        put_tree(root, crash, scen.inodes["burst"])
        timed("recovery", lambda: record_daemon(config, traces / "recovery.strace",
                                                lambda d: None))
        # Back to the tree the refit left (each check puts its own state anyway).
        put_tree(root, after_refit, None)
    return scen


def build_quick(root: Path, traces: Path, *, seed: int = 10, burst: int = 6,
                refit_k: int = 4) -> Scenario:
    """Two recordings, for a test: the first run (folders made beforehand, as a service
    install makes them), then `segd run` on the first run's kill -9 state with a journaled
    move open plus a burst in the inbox: it recovers, files the burst, refits through its
    control socket with a new k (files move, folders are made), and stops."""
    if not strace.available():
        raise RuntimeError("strace is not installed")
    traces.mkdir(parents=True, exist_ok=True)
    config = write_config(root, OVERRIDES)
    tree = Tree(config)
    tree.folders.state_dir.mkdir(mode=0o700)
    scen = Scenario(config, DropLedger())
    stash = root / ".crashsim-inodes"
    chosen = photos()
    seeds, arrivals = chosen[0::2][:seed], chosen[1::2][:burst]
    copy_photos(seeds, tree.inbox, "", scen.ledger)

    started = time.monotonic()
    scen.dropped["first-run"] = list(scen.ledger)
    first = scen.recordings["first-run"] = record_daemon(
        config, traces / "first-run.strace", lambda d: tree.wait_drained(seed, 180, d))
    scen.inodes["first-run"] = keep_inodes(root, first, stash / "first-run")
    scen.seconds["first-run"] = time.monotonic() - started

    started = time.monotonic()
    put_tree(root, crash_image(first, most_open_moves(first)), scen.inodes["first-run"])
    copy_photos(arrivals, tree.inbox, "", scen.ledger)
    bad = tree.inbox / "not-a-photo.jpg"  # through the quarantine's journaled move
    bad.write_bytes(b"these bytes are not an image\n" * 40)
    scen.ledger.record(bad)
    scen.dropped["after-crash"] = list(scen.ledger)

    def drive(daemon: TracedDaemon) -> None:
        tree.wait_drained(seed + burst + 1, 180, daemon)
        done = segd_cli(config, "refit", "--k", str(refit_k), timeout=180)
        assert done.returncode == 0, f"segd refit failed:\n{done.stdout}\n{done.stderr}"

    after = scen.recordings["after-crash"] = record_daemon(
        config, traces / "after-crash.strace", drive)
    scen.inodes["after-crash"] = keep_inodes(root, after, stash / "after-crash")
    scen.seconds["after-crash"] = time.monotonic() - started
    return scen


def put_tree(root: Path, img: Image, inodes: dict[int, Path] | None) -> None:
    for name in FOLDERS:
        shutil.rmtree(root / name, ignore_errors=True)
    img.materialize(root, inodes)


def _plain_run(config: Path, tree: Tree, n: int) -> None:
    daemon = DaemonProcess(config)
    try:
        daemon.start(timeout=120)
        tree.wait_drained(n, 180, daemon)
        daemon.stop(timeout=60)
    finally:
        daemon.cleanup()


def crash_image(rec: Recording, prefix: int) -> Image:
    """The tree after the first `prefix` operations, all of them kept (a kill -9)."""
    img = rec.initial.copy()
    for op in rec.ops[:prefix]:
        op.apply(img)
    return img
