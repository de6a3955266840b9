"""Journaled moves on a real store and real files: placement, collisions, crash recovery."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from segd.core.filing import Filing
from segd.state import fsops, mover
from segd.state.mover import MovePlan, journaled_move, recover_moves
from segd.state.store import ImageRow, MoveRow, Store, open_store

SHM = Path("/dev/shm")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "state" / "segd.db")
    yield s
    s.close()


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem: /dev/shm is missing or on the same device as tmp")
    folder = Path(tempfile.mkdtemp(prefix="segd-test-", dir=SHM))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def new_image(store: Store, path: Path, data: bytes, state: str = "pending") -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return store.add_image(sha(data), path.name, path, state)


def plan(image_id: int, src: Path, folder: Path, name: str | None = None) -> MovePlan:
    return MovePlan(image_id, src, folder, name or src.name, Filing("sorted", distance=0.25))


def no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(fsops.TMP_PREFIX) for p in folder.iterdir())


def recover(store: Store) -> int:
    return recover_moves(store, lambda move, image: replace(image.filing, state="sorted"))


# --------------------------------------------------------------------------- journaled_move


def test_same_filesystem(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "inbox" / "a.jpg"
    image_id = new_image(store, src, b"alpha")
    ino = os.stat(src).st_ino
    dst = journaled_move(store, plan(image_id, src, tmp_path / "library" / "cluster-01"))
    assert dst == tmp_path / "library" / "cluster-01" / "a.jpg"
    assert not src.exists() and os.stat(dst).st_ino == ino
    image = store.get_image(image_id)
    assert image is not None
    assert (image.path, image.state, image.distance) == (dst, "sorted", 0.25)
    assert store.pending_moves() == []


def test_across_filesystems(store: Store, tmp_path: Path, other_fs: Path) -> None:
    src = other_fs / "a.jpg"
    image_id = new_image(store, src, b"alpha" * 5000)
    folder = tmp_path / "library" / "cluster-01"
    dst = journaled_move(store, plan(image_id, src, folder))
    assert dst == folder / "a.jpg" and dst.read_bytes() == b"alpha" * 5000
    assert not src.exists()
    assert no_temp_files(folder)
    image = store.get_image(image_id)
    assert image is not None and image.path == dst and image.state == "sorted"
    assert store.pending_moves() == []


def test_collision_gets_a_suffix(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "library" / "cluster-01"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"someone else's")
    (folder / "a (2).jpg").symlink_to(tmp_path / "dangling")  # taken too, though dangling
    src = tmp_path / "inbox" / "a.jpg"
    image_id = new_image(store, src, b"ours")
    dst = journaled_move(store, plan(image_id, src, folder))
    assert dst == folder / "a (3).jpg" and dst.read_bytes() == b"ours"
    assert (folder / "a.jpg").read_bytes() == b"someone else's"
    assert store.pending_moves() == []
    image = store.get_image(image_id)
    assert image is not None and image.path == dst


def test_name_taken_between_check_and_link(store: Store, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "library"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"arrived a moment ago")
    src = tmp_path / "inbox" / "a.jpg"
    image_id = new_image(store, src, b"ours")
    real = os.path.lexists
    lied: list[str] = []

    def stale_lexists(path: Any) -> bool:  # the check ran before the other file arrived
        if Path(path) == folder / "a.jpg" and not lied:
            lied.append(str(path))
            return False
        return real(path)

    monkeypatch.setattr(mover.os.path, "lexists", stale_lexists)
    dst = journaled_move(store, plan(image_id, src, folder))
    assert lied and dst == folder / "a (2).jpg"
    assert (folder / "a.jpg").read_bytes() == b"arrived a moment ago"
    assert dst.read_bytes() == b"ours" and not src.exists()
    assert store.pending_moves() == []


def test_failed_copy_closes_the_journal(store: Store, tmp_path: Path, other_fs: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = other_fs / "a.jpg"
    image_id = new_image(store, src, b"data")
    folder = tmp_path / "library"

    def disk_full(*_a: object, **_k: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsops, "copy_to_temp", disk_full)
    with pytest.raises(OSError, match="No space"):
        journaled_move(store, plan(image_id, src, folder))
    assert src.read_bytes() == b"data"
    assert list(folder.iterdir()) == []
    assert store.pending_moves() == []
    image = store.get_image(image_id)
    assert image is not None and image.path == src and image.state == "pending"


# A name free on disk but still held by a stale image row (the user deleted that file while
# segd ran) must not be chosen as dst, and recovery must not trip over such a row either.


def test_name_held_by_a_stale_row(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "library" / "cluster-01"
    old = folder / "a.jpg"
    new_image(store, old, b"an earlier photo", state="sorted")
    old.unlink()  # deleted by the user; the store has not noticed yet
    src = tmp_path / "inbox" / "a.jpg"
    image_id = new_image(store, src, b"a new photo with the same name")
    dst = journaled_move(store, plan(image_id, src, folder))
    assert dst.read_bytes() == b"a new photo with the same name"
    assert image_path(store, image_id) == dst
    assert store.pending_moves() == []


def test_recover_into_a_name_held_by_a_stale_row(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "library" / "cluster-01"
    dst = folder / "a.jpg"
    new_image(store, dst, b"an earlier photo", state="sorted")
    dst.unlink()
    src = tmp_path / "inbox" / "a.jpg"
    image_id = new_image(store, src, b"a new photo with the same name")
    store.begin_move(image_id, src, dst)
    os.rename(src, dst)  # killed after placing the file
    recover(store)
    assert store.pending_moves() == []
    assert image_path(store, image_id) == dst


def test_vanished_source(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "inbox" / "a.jpg"
    image_id = new_image(store, src, b"data")
    src.unlink()
    with pytest.raises(FileNotFoundError):
        journaled_move(store, plan(image_id, src, tmp_path / "library"))
    assert store.pending_moves() == []


# --------------------------------------------------------------------------- journaled_moves
# The batch path the daemon files every network batch with. Each plan carries the stat of
# the file the daemon read (`expected`): a source replaced at any step must neither be filed
# under the old image's row nor lose the newer file.


def replace_file(path: Path, data: bytes) -> None:
    """What a writer saving atomically does: a new inode takes the name."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_plan(store: Store, src: Path, folder: Path, data: bytes, cluster_id: int,
              name: str | None = None) -> MovePlan:
    """A file arrived and was read: its row and its plan, as the daemon stages them."""
    image_id = new_image(store, src, data)
    return MovePlan(image_id, src, folder, name or src.name,
                    Filing.sorted_into(cluster_id, 0.125), expected=os.lstat(src))


@pytest.fixture
def cluster(store: Store) -> int:
    return store.add_cluster("c", [0.0] * store.dim)


def test_batch_files_each_in_one_journal_and_reports_each_failure(
        store: Store, tmp_path: Path, cluster: int, monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, folder = tmp_path / "inbox", tmp_path / "library" / "c"
    ok = [read_plan(store, inbox / f"{i}.jpg", folder, b"photo %d" % i, cluster)
          for i in range(3)]
    same_name = read_plan(store, inbox / "sub" / "0.jpg", folder, b"another 0.jpg", cluster)
    gone = read_plan(store, inbox / "gone.jpg", folder, b"gone", cluster)
    gone.src.unlink()
    rewritten = read_plan(store, inbox / "rewritten.jpg", folder, b"first", cluster)
    replace_file(rewritten.src, b"second, after it was read")
    journal_moves, commits = store.begin_moves, []

    def journal_recorded(moves: Any) -> list[int]:
        commits.append([image_id for image_id, *_ in moves])
        return journal_moves(moves)

    monkeypatch.setattr(store, "begin_moves", journal_recorded)
    results = mover.journaled_moves(store, [*ok, same_name, gone, rewritten])

    # One commit journals the batch; a file gone or changed since it was read is refused
    # before anything is journaled for it.
    assert commits == [[p.image_id for p in (*ok, same_name)]]

    assert results[:4] == [folder / "0.jpg", folder / "1.jpg", folder / "2.jpg",
                           folder / "0 (2).jpg"]
    assert isinstance(results[4], FileNotFoundError)
    assert isinstance(results[5], mover.SourceChangedError)
    for plan_, dst in zip([*ok, same_name], results[:4], strict=True):
        assert isinstance(dst, Path) and not plan_.src.exists()
        image = store.get_image(plan_.image_id)
        assert image is not None and sha(dst.read_bytes()) == image.sha256
        assert (image.path, image.filing) == (dst, Filing.sorted_into(cluster, 0.125))
    assert rewritten.src.read_bytes() == b"second, after it was read"  # never touched
    for plan_ in (gone, rewritten):
        image = store.get_image(plan_.image_id)
        assert image is not None and image.path == plan_.src and image.state == "pending"
    assert sorted(p.name for p in folder.iterdir()) == ["0 (2).jpg", "0.jpg", "1.jpg", "2.jpg"]
    assert store.pending_moves() == []


def test_batch_source_replaced_before_the_link_is_not_filed(
        store: Store, tmp_path: Path, cluster: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The name is linked, not the inode the daemon read: a file that took the name after
    # the check would be linked into the library under the old file's row. _check_linked
    # sees that dst is not the file read and takes the second name away again.
    folder = tmp_path / "library" / "c"
    kept = read_plan(store, tmp_path / "inbox" / "kept.jpg", folder, b"kept", cluster)
    swapped = read_plan(store, tmp_path / "inbox" / "a.jpg", folder, b"the photo read",
                        cluster)
    journal_moves = store.begin_moves

    def writer_strikes_after_the_journal_commit(moves: Any) -> list[int]:
        ids = journal_moves(moves)
        replace_file(swapped.src, b"a newer photo under the same name")
        return ids

    monkeypatch.setattr(store, "begin_moves", writer_strikes_after_the_journal_commit)
    results = mover.journaled_moves(store, [kept, swapped])
    assert results[0] == folder / "kept.jpg"
    assert isinstance(results[1], mover.SourceChangedError)
    assert not os.path.lexists(folder / "a.jpg")  # no second name of the newer file
    assert swapped.src.read_bytes() == b"a newer photo under the same name"
    image = store.get_image(swapped.image_id)
    assert image is not None and (image.path, image.state) == (swapped.src, "pending")
    assert image.sha256 == sha(b"the photo read")
    assert sorted(p.name for p in folder.iterdir()) == ["kept.jpg"]
    assert store.pending_moves() == []


def test_batch_source_replaced_after_the_link_survives(
        store: Store, tmp_path: Path, cluster: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between the link and the unlink a writer saves a new file under the source's name:
    # the file read is filed, and the newer one stays in the inbox (it is reported again).
    folder = tmp_path / "library" / "c"
    plan_ = read_plan(store, tmp_path / "inbox" / "a.jpg", folder, b"the photo read", cluster)
    sync = fsops.fsync_dir
    struck: list[Path] = []

    def writer_strikes_while_the_link_is_synced(path: Path) -> None:
        sync(path)
        if path == folder and not struck:
            struck.append(path)
            replace_file(plan_.src, b"a newer photo under the same name")

    monkeypatch.setattr(fsops, "fsync_dir", writer_strikes_while_the_link_is_synced)
    [result] = mover.journaled_moves(store, [plan_])
    assert struck and result == folder / "a.jpg"
    assert result.read_bytes() == b"the photo read"
    assert plan_.src.read_bytes() == b"a newer photo under the same name"
    image = store.get_image(plan_.image_id)
    assert image is not None and (image.path, image.filing) == (
        result, Filing.sorted_into(cluster, 0.125))
    assert store.pending_moves() == []


# --------------------------------------------------------------------------- recovery


@pytest.fixture
def crash(store: Store, tmp_path: Path) -> dict[str, Any]:
    """An image in the inbox, and a journal row for its move to library/c/a.jpg."""
    src = tmp_path / "inbox" / "a.jpg"
    folder = tmp_path / "library" / "c"
    folder.mkdir(parents=True)
    image_id = new_image(store, src, b"the photo")
    dst = folder / "a.jpg"
    return {"id": image_id, "src": src, "dst": dst, "folder": folder}


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def journal(store: Store, c: dict[str, Any], tmp: bool = False) -> MoveRow:
    tmp_path = c["folder"] / f"{fsops.TMP_PREFIX}{c['id']}" if tmp else None
    store.begin_move(c["id"], c["src"], c["dst"], tmp_path)
    [move] = store.pending_moves()
    return move


def image_path(store: Store, image_id: int) -> Path | None:
    image = store.get_image(image_id)
    return None if image is None else image.path


def test_recover_only_src_present_rolls_back(store: Store, crash: dict[str, Any]) -> None:
    journal(store, crash)
    assert recover(store) == 1
    assert crash["src"].read_bytes() == b"the photo" and not crash["dst"].exists()
    image = store.get_image(crash["id"])
    assert image is not None and image.path == crash["src"] and image.state == "pending"
    assert store.pending_moves() == []


def test_recover_only_dst_present_completes(store: Store, crash: dict[str, Any]) -> None:
    journal(store, crash)
    os.rename(crash["src"], crash["dst"])
    assert recover(store) == 1
    image = store.get_image(crash["id"])
    assert image is not None and image.path == crash["dst"] and image.state == "sorted"
    assert crash["dst"].read_bytes() == b"the photo"
    assert store.pending_moves() == []


def test_recover_both_present_same_inode_completes(store: Store,
                                                   crash: dict[str, Any]) -> None:
    journal(store, crash)
    os.link(crash["src"], crash["dst"])  # killed between link and unlink
    recover(store)
    assert not crash["src"].exists() and crash["dst"].read_bytes() == b"the photo"
    assert image_path(store, crash["id"]) == crash["dst"]
    assert store.pending_moves() == []


def test_recover_both_present_full_copy_completes(store: Store,
                                                  crash: dict[str, Any]) -> None:
    # Across filesystems: dst is a complete copy (same bytes, another inode), src not yet gone.
    journal(store, crash)
    shutil.copy(crash["src"], crash["dst"])
    recover(store)
    assert not crash["src"].exists() and crash["dst"].read_bytes() == b"the photo"
    assert image_path(store, crash["id"]) == crash["dst"]


def test_recover_the_source_name_taken_away_but_not_unlinked(store: Store,
                                                              crash: dict[str, Any]) -> None:
    """Killed after the link, with the source's name renamed to its private one: ours is
    placed, so the private name goes."""
    journal(store, crash)
    os.link(crash["src"], crash["dst"])
    os.rename(crash["src"], fsops.hidden_name(crash["src"]))
    recover(store)
    assert sorted(p.name for p in crash["src"].parent.iterdir()) == []
    assert crash["dst"].read_bytes() == b"the photo"
    assert image_path(store, crash["id"]) == crash["dst"]
    assert store.pending_moves() == []


def test_recover_a_replacement_under_the_private_name_gets_its_name_back(
        store: Store, crash: dict[str, Any]) -> None:
    """Killed while the private name held a file that had replaced the source: it is
    given the source's name back and left for the inbox scan; ours is placed."""
    journal(store, crash)
    os.link(crash["src"], crash["dst"])
    newer = write_file(crash["src"].parent / "next.jpg", b"a newer photo")
    os.rename(newer, crash["src"])  # replaced after the link...
    os.rename(crash["src"], fsops.hidden_name(crash["src"]))  # ...then the name taken away
    recover(store)
    assert crash["src"].read_bytes() == b"a newer photo"
    assert sorted(p.name for p in crash["src"].parent.iterdir()) == ["a.jpg"]
    assert crash["dst"].read_bytes() == b"the photo"
    assert image_path(store, crash["id"]) == crash["dst"]
    assert store.pending_moves() == []


def test_recover_a_replaced_source_is_not_unlinked(store: Store,
                                                   crash: dict[str, Any]) -> None:
    """Across filesystems: dst a complete copy, and the source name now holds another
    file: that file stays."""
    journal(store, crash)
    shutil.copy(crash["src"], crash["dst"])
    newer = write_file(crash["src"].parent / "next.jpg", b"a newer photo")
    os.rename(newer, crash["src"])
    recover(store)
    assert crash["src"].read_bytes() == b"a newer photo"
    assert crash["dst"].read_bytes() == b"the photo"
    assert image_path(store, crash["id"]) == crash["dst"]


def test_recover_dst_taken_by_another_file_rolls_back(store: Store,
                                                      crash: dict[str, Any]) -> None:
    journal(store, crash)
    crash["dst"].write_bytes(b"a different photo that took the name")
    before = os.stat(crash["dst"])
    recover(store)
    assert crash["src"].read_bytes() == b"the photo"
    assert crash["dst"].read_bytes() == b"a different photo that took the name"
    assert os.stat(crash["dst"]).st_ino == before.st_ino
    assert image_path(store, crash["id"]) == crash["src"]
    assert store.pending_moves() == []


def test_recover_planned_with_tmp_removes_the_partial_copy(store: Store,
                                                           crash: dict[str, Any]) -> None:
    move = journal(store, crash, tmp=True)
    assert move.tmp is not None and move.state == "planned"
    move.tmp.write_bytes(b"the ph")  # killed while copying
    recover(store)
    assert not move.tmp.exists() and not crash["dst"].exists()
    assert crash["src"].read_bytes() == b"the photo"
    assert image_path(store, crash["id"]) == crash["src"]
    assert list(crash["folder"].iterdir()) == []


def test_recover_copied_with_tmp_completes(store: Store, crash: dict[str, Any]) -> None:
    move = journal(store, crash, tmp=True)
    assert move.tmp is not None
    shutil.copy(crash["src"], move.tmp)
    store.mark_move_copied(move.id)  # killed after the copy was recorded, before the link
    recover(store)
    assert not move.tmp.exists() and not crash["src"].exists()
    assert crash["dst"].read_bytes() == b"the photo"
    image = store.get_image(crash["id"])
    assert image is not None and image.path == crash["dst"] and image.state == "sorted"
    assert store.pending_moves() == []


def test_recover_copied_and_linked_removes_tmp(store: Store, crash: dict[str, Any]) -> None:
    move = journal(store, crash, tmp=True)
    assert move.tmp is not None
    shutil.copy(crash["src"], move.tmp)
    store.mark_move_copied(move.id)
    os.link(move.tmp, crash["dst"])  # killed between the link and the tmp's unlink
    recover(store)
    assert not move.tmp.exists() and not crash["src"].exists()
    assert crash["dst"].read_bytes() == b"the photo"
    assert image_path(store, crash["id"]) == crash["dst"]


def test_recover_neither_present_forgets_the_image(store: Store,
                                                   crash: dict[str, Any]) -> None:
    journal(store, crash)
    crash["src"].unlink()  # a user removed the file meanwhile
    recover(store)
    assert store.get_image(crash["id"]) is None
    assert store.pending_moves() == []


def test_recover_row_whose_image_was_forgotten(store: Store, crash: dict[str, Any]) -> None:
    journal(store, crash)
    os.rename(crash["src"], crash["dst"])
    store.delete_image(crash["id"])  # the journal row's image_id becomes NULL
    assert store.pending_moves()[0].image_id is None
    recover(store)
    assert store.pending_moves() == []
    assert crash["dst"].exists()


def test_recover_passes_the_move_and_image_to_filing_for(store: Store,
                                                         crash: dict[str, Any]) -> None:
    move = journal(store, crash)
    os.rename(crash["src"], crash["dst"])
    before = store.get_image(crash["id"])
    seen: list[tuple[MoveRow, ImageRow]] = []

    def filing_for(m: MoveRow, image: ImageRow) -> Filing:
        seen.append((m, image))
        return Filing("sorted", distance=0.5)

    recover_moves(store, filing_for)
    assert seen == [(move, before)]
    image = store.get_image(crash["id"])
    assert image is not None and (image.path, image.filing) == (
        crash["dst"], Filing("sorted", distance=0.5))


# --------------------------------------------------------------------------- SIGKILL


_MOVER = """
import random, sys
from pathlib import Path
from segd.state.mover import MovePlan, journaled_move
from segd.state.store import Filing, open_store

db, seed, *folders = sys.argv[1:]
folders = [Path(f) for f in folders]
rng = random.Random(int(seed))
store = open_store(Path(db))
images = list(store.iter_images())
print("ready", flush=True)
while True:
    image = store.get_image(rng.choice(images).id)
    target = rng.choice([f for f in folders if f != image.path.parent])
    journaled_move(store, MovePlan(image.id, image.path, target, image.original_name,
                                   Filing("sorted")))
    store.set_meta("moves", str(int(store.get_meta("moves", "0")) + 1))
"""


def _check_after_recovery(db: Path, folders: list[Path], contents: dict[str, bytes]) -> int:
    """Recover as the daemon does at start, then: every file exactly once, store agrees."""
    with open_store(db) as store:
        recovered = recover(store)
        assert store.pending_moves() == []
        assert store.integrity_check() == "ok"
        images = {im.original_name: im for im in store.iter_images()}
    assert sorted(images) == sorted(contents)  # nothing lost, nothing forgotten
    on_disk = [p for f in folders for p in f.iterdir()]
    assert all(not p.name.startswith(fsops.TMP_PREFIX) for p in on_disk), on_disk
    assert sorted(p.name for p in on_disk) == sorted(contents)  # each file exactly once
    for name, image in images.items():
        assert image.path.read_bytes() == contents[name]
        assert image.sha256 == sha(contents[name])
    return recovered


def test_sigkill_during_moves(tmp_path: Path) -> None:
    folders = [tmp_path / "a", tmp_path / "b"]
    if SHM.is_dir() and os.stat(SHM).st_dev != os.stat(tmp_path).st_dev:
        folders.append(Path(tempfile.mkdtemp(prefix="segd-test-", dir=SHM)))  # cross-fs moves
    for f in folders:
        f.mkdir(exist_ok=True)
    db = tmp_path / "state" / "segd.db"
    rng = random.Random(20240607)
    contents = {f"img_{i:02d}.jpg": rng.randbytes(rng.randrange(1000, 300_000))
                for i in range(12)}
    with open_store(db) as store:
        for name, data in contents.items():
            new_image(store, folders[0] / name, data, state="sorted")
    kills = rounds_with_open_moves = 0
    try:
        while kills < 5 or (rounds_with_open_moves < 2 and kills < 12):
            proc = subprocess.Popen(
                [sys.executable, "-c", _MOVER, str(db), str(rng.randrange(1 << 30)),
                 *map(str, folders)], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", f"mover died (rc={proc.poll()})"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.05, 0.5))
            assert proc.poll() is None, "the mover stopped by itself"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            kills += 1
            rounds_with_open_moves += _check_after_recovery(db, folders, contents) > 0
    finally:
        for f in folders[2:]:
            shutil.rmtree(f, ignore_errors=True)
    with open_store(db) as store:
        assert int(store.get_meta("moves", "0")) > 0  # the kills interrupted real work
    assert rounds_with_open_moves >= 1, "no kill landed inside a move"
