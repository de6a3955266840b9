"""The embedding cache on real SQLite files: round trips, damage, the bound, two processes,
the stat index."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from segd.state import cache as cache_mod
from segd.state.cache import CacheKey, EmbeddingCache, FileStat, HashedFile, default_cache_path

DIM = 1280
KEY = CacheKey(model_sha256="a" * 64, input_size=None, resize="crop", mirror=False,
               precision="fp32", max_pixels=100_000_000).digest


def sha(i: int) -> str:
    return hashlib.sha256(f"file {i}".encode()).hexdigest()


def vector(sha_hex: str) -> np.ndarray:
    """A vector only this content has: any mix-up between rows shows."""
    rng = np.random.default_rng(int(sha_hex[:12], 16))
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def items(indices: range | list[int]) -> list[tuple[str, np.ndarray]]:
    return [(sha(i), vector(sha(i))) for i in indices]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "embeddings.sqlite"


def test_vectors_come_back_bit_for_bit_and_only_under_their_key(path: Path) -> None:
    with EmbeddingCache.open(path) as c:
        c.put_many(KEY, items(range(20)))
        got = c.get_many(KEY, [sha(i) for i in range(25)])
        other = c.get_many("another model", [sha(i) for i in range(20)])
    assert sorted(got) == sorted(sha(i) for i in range(20))
    for s, v in got.items():
        assert v.dtype == np.float32
        assert v.tobytes() == vector(s).tobytes()
    assert other == {}


def test_the_key_changes_with_the_model_and_with_every_preprocessing_setting() -> None:
    base = CacheKey(model_sha256="a" * 64, input_size=None, resize="crop", mirror=False,
                    precision="fp32", max_pixels=100_000_000)
    variants = [
        CacheKey(**{**base.__dict__, "model_sha256": "b" * 64}),
        CacheKey(**{**base.__dict__, "input_size": 224}),
        CacheKey(**{**base.__dict__, "resize": "squash"}),
        CacheKey(**{**base.__dict__, "mirror": True}),
        CacheKey(**{**base.__dict__, "precision": "fp16"}),
        CacheKey(**{**base.__dict__, "max_pixels": 1000}),
        CacheKey(**{**base.__dict__, "decoder": "segd 99"}),
    ]
    digests = {base.digest, *(v.digest for v in variants)}
    assert len(digests) == 1 + len(variants)


def test_the_file_is_private_and_lives_under_xdg_cache_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "segd" / "embeddings.sqlite"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the spec says: ignore it
    assert default_cache_path() == Path.home() / ".cache" / "segd" / "embeddings.sqlite"
    p = tmp_path / "c" / "embeddings.sqlite"
    with EmbeddingCache.open(p) as c:
        c.put_many(KEY, items(range(3)))
    assert p.stat().st_mode & 0o777 == 0o600
    assert p.parent.stat().st_mode & 0o777 == 0o700


def test_a_flipped_bit_in_a_stored_vector_is_a_miss_not_a_wrong_vector(path: Path) -> None:
    with EmbeddingCache.open(path) as c:
        c.put_many(KEY, items(range(5)))
    # The WAL is folded into the file when the last connection closes: edit the file itself.
    data = bytearray(path.read_bytes())
    # The first bytes of a vector lie in its row's own page (the rest overflows).
    target = vector(sha(2)).tobytes()[:256]
    at = data.find(target)
    assert at >= 0
    data[at + 100] ^= 0x01
    path.write_bytes(bytes(data))
    with EmbeddingCache.open(path) as c:
        got = c.get_many(KEY, [sha(i) for i in range(5)])
        assert c.stats.rejected == 1
        assert sha(2) not in got
        assert all(v.tobytes() == vector(s).tobytes() for s, v in got.items())
        # The bad row is gone; storing the vector again makes it a hit again.
        c.put_many(KEY, items([2]))
        assert c.get_many(KEY, [sha(2)])[sha(2)].tobytes() == vector(sha(2)).tobytes()


def test_garbage_bytes_are_set_aside_and_a_new_cache_started(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path.parent.mkdir(parents=True)
    garbage = os.urandom(64 * 1024)
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="segd.state.cache"), \
            EmbeddingCache.open(path) as c:
        assert c.enabled
        assert c.stats.set_aside == 1
        c.put_many(KEY, items(range(3)))
        assert len(c.get_many(KEY, [sha(i) for i in range(3)])) == 3
    assert "damaged" in caplog.text
    assert (path.parent / "embeddings.sqlite.corrupt").read_bytes() == garbage


def test_a_truncated_file_gives_no_wrong_vector_and_is_rebuilt(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with EmbeddingCache.open(path) as c:
        c.put_many(KEY, items(range(300)))
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="segd.state.cache"), \
            EmbeddingCache.open(path) as c:
        got = c.get_many(KEY, [sha(i) for i in range(300)])
        # Whatever came back before the damage showed is right; the rest is a miss.
        assert all(v.tobytes() == vector(s).tobytes() for s, v in got.items())
        assert len(got) < 300
        assert c.stats.set_aside == 1
        assert c.enabled
        c.put_many(KEY, items(range(10)))
        assert len(c.get_many(KEY, [sha(i) for i in range(10)])) == 10
    assert "damaged" in caplog.text
    assert (path.parent / "embeddings.sqlite.corrupt").exists()


def test_another_programs_sqlite_file_is_set_aside(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    with EmbeddingCache.open(path) as c:
        assert c.stats.set_aside == 1
        c.put_many(KEY, items(range(2)))
        assert len(c.get_many(KEY, [sha(0), sha(1)])) == 2


def test_a_cache_from_a_newer_segd_is_left_alone(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with EmbeddingCache.open(path) as c:
        c.put_many(KEY, items(range(2)))
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {cache_mod.FORMAT + 1}")
    conn.close()
    with caplog.at_level(logging.WARNING, logger="segd.state.cache"), \
            EmbeddingCache.open(path) as c:
        assert not c.enabled
        assert c.get_many(KEY, [sha(0)]) == {}
        c.put_many(KEY, items(range(3)))  # a no-op, not an error
    assert "off for this run" in caplog.text
    assert not (path.parent / "embeddings.sqlite.corrupt").exists()


def test_an_unusable_folder_turns_the_cache_off_instead_of_failing(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with EmbeddingCache.open(blocker / "embeddings.sqlite") as c:
        assert not c.enabled
        c.put_many(KEY, items(range(2)))
        assert c.get_many(KEY, [sha(0)]) == {}


def test_the_size_stays_bounded_and_the_least_recently_used_go_first(path: Path) -> None:
    bound = 400 * 1024  # about 60 vectors
    with EmbeddingCache.open(path, max_bytes=bound) as c:
        c.put_many(KEY, items(range(40)))
        for start in range(40, 400, 40):
            c.put_many(KEY, items(range(start, start + 40)))
            assert c.live_bytes() <= bound
        got = c.get_many(KEY, [sha(i) for i in range(400)])
        assert c.stats.evicted >= 300
    assert path.stat().st_size <= 2 * bound  # freed pages are reused: the file stops growing
    assert sha(2) not in got  # old and unused: evicted
    assert {sha(i) for i in range(380, 400)} <= set(got)  # the newest stay


def test_the_used_row_outlives_older_writes(path: Path) -> None:
    """LRU, not FIFO: a row read again is kept over rows written after it."""
    bound = 400 * 1024
    with EmbeddingCache.open(path, max_bytes=bound) as c:
        c.put_many(KEY, items(range(30)))
        c.put_many(KEY, items(range(30, 50)))
        c.get_many(KEY, [sha(0)])
        c.put_many(KEY, items(range(50, 80)))
        got = c.get_many(KEY, [sha(i) for i in range(80)])
    assert sha(0) in got
    assert sha(1) not in got


WRITER = textwrap.dedent("""
    import hashlib, sys, time
    from pathlib import Path
    import numpy as np
    from segd.state.cache import EmbeddingCache

    path, go, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

    def sha(i):
        return hashlib.sha256(f"file {i}".encode()).hexdigest()

    def vector(s):
        v = np.random.default_rng(int(s[:12], 16)).standard_normal(1280).astype(np.float32)
        return v / np.linalg.norm(v)

    while not go.exists():
        time.sleep(0.001)
    rng = np.random.default_rng(seed)
    checked = 0
    with EmbeddingCache.open(path) as c:
        for _ in range(40):
            batch = [int(i) for i in rng.choice(300, size=16, replace=False)]
            c.put_many("k", [(sha(i), vector(sha(i))) for i in batch])
            got = c.get_many("k", [sha(i) for i in rng.choice(300, size=64)])
            for s, v in got.items():
                assert v.tobytes() == vector(s).tobytes(), "a wrong vector"
            checked += len(got)
        assert c.enabled and c.stats.set_aside == 0
    print(checked)
""")


def test_two_processes_writing_at_once_share_it_safely(path: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(go), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    go.touch()  # both start together: their writes interleave
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert int(out) > 0
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with EmbeddingCache.open(path) as c:
        got = c.get_many("k", [sha(i) for i in range(300)])
    assert len(got) > 200
    assert all(v.tobytes() == vector(s).tobytes() for s, v in got.items())


# --------------------------------------------------------------------------- the stat index

NOW_NS = 1_700_000_000 * 10**9
STAT = FileStat(size=12345, mtime_ns=NOW_NS - 10**10, ctime_ns=NOW_NS - 10**10,
                inode=2**63 + 7, device=2**64 - 3)  # unsigned 64-bit values SQLite has not


def hashed(path: bytes, st: FileStat, i: int, read_ns: int = NOW_NS) -> HashedFile:
    return HashedFile(path, st, sha(i), read_ns)


def test_the_stat_index_gives_a_hash_only_for_the_very_stat_it_was_filed_under(
        path: Path) -> None:
    with EmbeddingCache.open(path) as c:
        c.remember_hashes([hashed(b"/p/a.jpg", STAT, 1), hashed(b"/p/b.jpg", STAT, 2)])
        assert c.known_hashes([(b"/p/a.jpg", STAT), (b"/p/b.jpg", STAT),
                               (b"/p/c.jpg", STAT)]) == {b"/p/a.jpg": sha(1), b"/p/b.jpg": sha(2)}
        for field in ("size", "mtime_ns", "ctime_ns", "inode", "device"):
            changed = dataclasses.replace(STAT, **{field: getattr(STAT, field) + 1})
            assert c.known_hashes([(b"/p/a.jpg", changed)]) == {}, field
        # Hashed again under a new stat: the old one no longer answers.
        newer = dataclasses.replace(STAT, ctime_ns=STAT.ctime_ns + 1)
        c.remember_hashes([hashed(b"/p/a.jpg", newer, 3)])
        assert c.known_hashes([(b"/p/a.jpg", STAT)]) == {}
        assert c.known_hashes([(b"/p/a.jpg", newer)]) == {b"/p/a.jpg": sha(3)}
        assert c.stats.indexed == 3


def test_a_hash_read_within_the_settling_time_of_the_files_ctime_is_not_filed(
        path: Path) -> None:
    """A change in the same timestamp tick as the stat keeps every field: such a hash would
    hide it, so it is not kept (the file is read again next time)."""
    fresh = dataclasses.replace(STAT, ctime_ns=NOW_NS - cache_mod.SETTLED_NS + 1)
    settled_one = dataclasses.replace(STAT, ctime_ns=NOW_NS - cache_mod.SETTLED_NS)
    assert not cache_mod.settled(fresh, NOW_NS)
    assert cache_mod.settled(settled_one, NOW_NS)
    with EmbeddingCache.open(path) as c:
        c.remember_hashes([hashed(b"/p/new.jpg", fresh, 1), hashed(b"/p/old.jpg", settled_one, 2)])
        assert c.known_hashes([(b"/p/new.jpg", fresh), (b"/p/old.jpg", settled_one)]) == \
            {b"/p/old.jpg": sha(2)}


def test_a_cache_made_before_the_index_gets_one_and_keeps_its_vectors(path: Path) -> None:
    with EmbeddingCache.open(path) as c:
        c.put_many(KEY, items(range(3)))
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE files")  # as an older segd made it
    conn.close()
    with EmbeddingCache.open(path) as c:
        assert c.enabled and c.stats.set_aside == 0
        assert len(c.get_many(KEY, [sha(i) for i in range(3)])) == 3
        c.remember_hashes([hashed(b"/p/a.jpg", STAT, 1)])
        assert c.known_hashes([(b"/p/a.jpg", STAT)]) == {b"/p/a.jpg": sha(1)}


def test_the_stat_index_shrinks_with_the_cache(path: Path) -> None:
    bound = 400 * 1024
    with EmbeddingCache.open(path, max_bytes=bound) as c:
        for start in range(0, 400, 40):
            c.remember_hashes([hashed(f"/p/{i}.jpg".encode(), STAT, i, NOW_NS + i)
                               for i in range(start, start + 40)])
            c.put_many(KEY, items(range(start, start + 40)))
            assert c.live_bytes() <= bound
        known = c.known_hashes([(f"/p/{i}.jpg".encode(), STAT) for i in range(400)])
    assert 0 < len(known) < 400
    assert b"/p/0.jpg" not in known and b"/p/399.jpg" in known  # the oldest go first


def test_only_filesystems_with_a_true_change_time_are_served_by_stat() -> None:
    for fstype in ("ext4", "xfs", "btrfs", "tmpfs", "nfs4"):
        assert cache_mod.keeps_change_time(fstype), fstype
    # FAT's ctime is the creation time; FUSE and SMB promise nothing; unknown is unknown.
    for fstype in ("vfat", "msdos", "exfat", "ntfs3", "fuse.sshfs", "cifs", None):
        assert not cache_mod.keeps_change_time(fstype), fstype
