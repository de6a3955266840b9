"""Shards: the listing's bytes, the key, shard files written whole or not at all, resuming.

No Ray here: a shard is embedded in-process with segd's real pipeline and decoder on the
CC0 test photos, with a stand-in network (the mean colour of the image, normalised), so the
tests check what the shard files hold rather than the model.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from segd.batch import shards
from segd.batch.shards import Entry, Shard
from segd.core.errors import EmptyFileError, NotAnImageError, SegdError
from segd.media.decode import DecodeOptions

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"
DECODE = DecodeOptions(size=32)
IDENTITY = "model-sha256"


def mean_colour(images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32) + 1.0
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    for photo in sorted(PHOTOS.glob("*/*.jpg"))[:10]:
        shutil.copy2(photo, folder / photo.name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo\n")
    return folder


def listed(src: Path) -> list[Entry]:
    return shards.stat_entries(sorted(src.iterdir()))


def embed_all(dest: Path, cut: list[Shard]) -> list[shards.ShardSummary]:
    return [shards.embed_shard(dest, s, identity=IDENTITY, decode=DECODE, embed=mean_colour,
                               dim=3, batch_size=4, workers=2) for s in cut]


def test_entries_survive_the_round_trip_whatever_their_names(tmp_path: Path) -> None:
    odd = [Entry(tmp_path / os.fsdecode(b"caf\xe9.jpg"), 10, 1), Entry(tmp_path / "a\nb.jpg",
                                                                       -1, -1),
           Entry(tmp_path / "plain.jpg", 2**40, 1_700_000_000_123_456_789)]
    assert shards.decode_entries(shards.encode_entries(odd)) == odd
    assert shards.decode_entries(shards.encode_entries([])) == []


def test_the_key_follows_the_model_the_decoding_and_each_file(src: Path) -> None:
    entries = listed(src)
    blob = shards.encode_entries(entries)
    key = shards.shard_key(blob, IDENTITY, DECODE)
    assert key == shards.shard_key(shards.encode_entries(listed(src)), IDENTITY, DECODE)
    touched = [dataclasses.replace(entries[0], mtime_ns=entries[0].mtime_ns + 1), *entries[1:]]
    others = {shards.shard_key(shards.encode_entries(touched), IDENTITY, DECODE),
              shards.shard_key(blob, "another-model", DECODE),
              shards.shard_key(blob, IDENTITY, dataclasses.replace(DECODE, resize="squash"))}
    assert key not in others and len(others) == 3


def test_a_shard_file_holds_the_embeddings_and_the_reasons(src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    entries = listed(src)
    cut = shards.write_listing(dest, entries, 5, IDENTITY, DECODE)
    assert [s.count for s in cut] == [5, 5, 2]
    summaries = embed_all(dest, cut)
    assert sum(s.count for s in summaries) == 12 and sum(s.failed for s in summaries) == 2
    assert all(shards.is_done(dest, s) for s in cut)

    got = [shards.read_shard(dest, s) for s in cut]
    assert [e for g in got for e in g.entries] == entries
    errors = {g.entries[i].path.name: err for g in got for i, err in g.errors.items()}
    assert isinstance(errors["empty.jpg"], EmptyFileError)
    assert isinstance(errors["notes.jpg"], NotAnImageError)
    assert str(errors["empty.jpg"].path) == str(src / "empty.jpg")
    # The rows the fit reads: one per readable file, in listing order, as decoded now.
    rows = np.concatenate(list(shards.embedding_chunks(dest, cut)()))
    readable = [e.path for e in entries if e.path.name not in errors]
    assert len(rows) == len(readable) == 10
    from segd.media.decode import decode_file

    expected = mean_colour(np.stack([decode_file(p, DECODE) for p in readable]))
    np.testing.assert_allclose(rows, expected, rtol=1e-6)


def test_a_re_run_finds_finished_shards_and_a_changed_file_only_redoes_its_own(
        src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    cut = shards.write_listing(dest, listed(src), 5, IDENTITY, DECODE)
    embed_all(dest, cut[:2])
    assert [shards.is_done(dest, s) for s in cut] == [True, True, False]
    first = sorted(src.iterdir())[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    again = shards.write_listing(dest, listed(src), 5, IDENTITY, DECODE)
    assert [shards.is_done(dest, s) for s in again] == [False, True, False]
    assert [s.key for s in again[1:]] == [s.key for s in cut[1:]]


KILLED_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from segd.batch import shards

def half_then_hang(fh, **arrays):
    fh.write(b"PK\\x03\\x04 half a zip")
    fh.flush()
    Path(sys.argv[2]).touch()
    time.sleep(120)

shards.np.savez = half_then_hang
shards.write_shard_file(Path(sys.argv[1]), {}, b"", np.zeros(0, bool),
                        np.zeros((0, 3), np.float32), [])
"""


def test_a_worker_killed_while_writing_leaves_no_shard_file(src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    cut = shards.write_listing(dest, listed(src), 20, IDENTITY, DECODE)
    target = shards.shard_path(dest, cut[0].key)
    ready = tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert not target.exists() and not shards.is_done(dest, cut[0])
    assert shards.remove_temporaries(dest) == 1  # its half file, under a temporary name
    assert list(shards.shards_folder(dest).iterdir()) == []


def test_a_truncated_shard_file_is_not_done_and_temporaries_are_cleared(
        src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    cut = shards.write_listing(dest, listed(src), 20, IDENTITY, DECODE)
    path = shards.shard_path(dest, cut[0].key)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not a whole file")  # e.g. copied in by hand, cut short
    assert not shards.is_done(dest, cut[0])
    left = shards.shards_folder(dest) / ".tmp-abc.npz-123-deadbeef"
    left.write_bytes(b"x")
    assert shards.remove_temporaries(dest) == 1 and not left.exists()


def test_a_listing_changed_under_a_shard_is_refused(src: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    cut = shards.write_listing(dest, listed(src), 5, IDENTITY, DECODE)
    shards.write_listing(dest, listed(src)[1:], 5, IDENTITY, DECODE)  # another run's listing
    with pytest.raises(SegdError, match="listing"):
        shards.read_shard_entries(dest, cut[1], IDENTITY, DECODE)
