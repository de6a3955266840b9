"""Power loss: the states a crash could leave, built from the real daemon's system calls.

After SQLite's crash tests and ALICE (Pillai et al., OSDI 2014): `segd run` runs under
strace, its file-system calls are replayed into operations on the tree's inodes (checked:
the replay reproduces the disk byte for byte), and every crash point, with what the disk
may not have made durable yet dropped (tests/support/crashsim/states.py: the `posix`
model, only what fsync promises), is put on disk; segd's start-up recovery runs on it and
the invariant must hold. A sample of states here (crash points around every directory
operation and sync); bench/crash_states.py explores all of them and prints the figures
(docs/reliability.md, "Power loss: crash-state exploration").
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from crashsim import strace
from crashsim.explore import Figures, explore
from crashsim.fsmodel import Create, Image, Link, Sync, Unlink
from crashsim.replay import Recording
from crashsim.scenario import Scenario, build_quick, crash_image, finish, work_root
from crashsim.states import Explorer
from daemon_harness import write_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not strace.available(),
                       reason="strace is not installed (apt-get install strace) or may not "
                              "trace here (ptrace forbidden): the crash states are built "
                              "from the daemon's recorded system calls"),
]

SAMPLE = 500  # states per recording: every kill -9 and lose-everything state, then random


@pytest.fixture(scope="module")
def scen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    disk = tmp_path_factory.mktemp("crash")
    base = work_root(disk)
    try:
        yield build_quick(base / "tree", disk / "traces")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _report(fig: Figures) -> str:
    out = [fig.line()] + [f"  {n} x {why}" for why, n in fig.causes.most_common()]
    for f in fig.findings[:3]:
        out += [f"-- {f.state.kind} after {f.after}; lost: {'; '.join(f.dropped) or '-'}",
                f.detail]
    return "\n".join(out)


def test_the_recordings_hold_the_whole_protocol(scen: Scenario) -> None:
    """The replay reproduced the disk (build_quick refuses otherwise); and what was
    recorded is the real thing: journal commits synced, links out of the inbox, the
    unlinks behind them, new cluster folders, the moves of a refit."""
    for name in ("first-run", "after-crash"):
        rec = scen.recordings[name]
        inbox = rec.initial.lookup([b"inbox"])
        wal_syncs = [op for op in rec.ops if isinstance(op, Sync) and op.ino is not None
                     and rec.names.get(op.ino, "").endswith("segd.db-wal")]
        links = [op for op in rec.ops if isinstance(op, Link) and op.dir != inbox]
        unlinks = [op for op in rec.ops if isinstance(op, Unlink) and op.dir == inbox]
        assert len(wal_syncs) >= 5 and len(links) >= 10 and len(unlinks) >= 10, name
    after = scen.recordings["after-crash"]
    made = [op for op in after.ops if isinstance(op, Create) and op.kind == "dir"]
    assert [after.names[op.ino] for op in made] == ["library/cluster-03", "library/cluster-04"]


@pytest.mark.parametrize("name", ["first-run", "after-crash"])
def test_every_sampled_crash_state_recovers(scen: Scenario, name: str) -> None:
    fig = explore(name, scen.recordings[name], scen.checker(name), model="posix",
                  sample=SAMPLE, focus=True, inodes=scen.inodes[name], keep_findings=10_000)
    print(_report(fig))
    assert fig.distinct >= 100, fig.line()
    assert fig.recovered_moves > 0, "no state had a journaled move open"
    assert not fig.findings, _report(fig)


def test_new_cluster_folders_are_durable_before_files_move_in(scen: Scenario) -> None:
    """Found by the exploration: a refit made library/cluster-N and moved files into it,
    but never synced the library, so a power cut could drop the folder with the files the
    journal had already taken out of their old folder. Every folder made must be durable
    before the first file is linked into it."""
    rec = scen.recordings["after-crash"]
    ex = Explorer(rec.initial, rec.ops, model="posix")
    for i, op in enumerate(ex.ops):
        if isinstance(op, Create) and op.kind == "dir":
            first_link = next(j for j, o in enumerate(ex.ops)
                              if isinstance(o, Link) and o.dir == op.ino)
            assert ex.durable_at[i] < first_link, (
                f"{op.describe(rec.names)} (#{i}) is not durable before #{first_link} "
                f"{ex.ops[first_link].describe(rec.names)}")


def test_quarantine_cut_short_leaves_no_hashless_row(scen: Scenario) -> None:
    """A kill -9 (or power cut) after the quarantine's placeholder row was committed and
    before its journal row: start-up recovery leaves a pending row with no sha256."""
    rec = scen.recordings["after-crash"]
    quarantine = rec.initial.lookup([b"quarantine"])
    link = next(i for i, op in enumerate(rec.ops)
                if isinstance(op, Link) and op.dir == quarantine)
    commits = [i for i, op in enumerate(rec.ops[:link]) if isinstance(op, Sync)
               and rec.names.get(op.ino or 0, "").endswith("segd.db-wal")]
    placeholder_committed = commits[-2] + 1  # the next commit is the journal row
    outcome = scen.checker("after-crash").check(crash_image(rec, placeholder_committed),
                                                scen.inodes["after-crash"])
    assert outcome.ok, outcome.detail


def _record_python(tmp_path: Path, code: str, *args: str) -> Recording:
    """`python -c code args` under strace, replayed over the (synced) tree in tmp_path."""
    root = tmp_path / "tree"
    root.mkdir(exist_ok=True)
    trace = tmp_path / "python.strace"
    initial = Image.from_disk(root, ("inbox", "library", "quarantine", "state"))
    done = subprocess.run([*strace.command(trace), sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return finish(root, trace, initial)


def _not_durable(rec: Recording) -> list[str]:
    ex = Explorer(rec.initial, rec.ops, model="posix")
    return [op.describe(rec.names) for i, op in enumerate(ex.ops)
            if isinstance(op, Create) and ex.durable_at[i] >= len(ex.ops)]


def test_make_dirs_syncs_each_new_folder_into_its_parent(tmp_path: Path) -> None:
    rec = _record_python(tmp_path, "import sys; from pathlib import Path; "
                         "from segd.state.fsops import make_dirs; make_dirs(Path(sys.argv[1]))",
                         str(tmp_path / "tree" / "library" / "a" / "b"))
    made = [op for op in rec.ops if isinstance(op, Create)]
    assert len(made) == 3
    assert _not_durable(rec) == []


def test_first_start_makes_its_folders_durable(tmp_path: Path) -> None:
    """The daemon's first start creates its folders (check_folders_writable) and files
    photos into them; a folder whose name is not durable takes them along in a power cut
    (the state folder takes the journal). Found by the exploration; fixed with make_dirs."""
    config = write_config(tmp_path / "tree")
    rec = _record_python(tmp_path, "import sys; from pathlib import Path; "
                         "from segd.config import parse_config_file; "
                         "from segd.state.folders import check_folders_writable; "
                         "check_folders_writable(parse_config_file(Path(sys.argv[1])))",
                         str(config))
    assert len([op for op in rec.ops if isinstance(op, Create)]) == 4
    assert _not_durable(rec) == []
