"""File placement: free names, no-clobber links, copies and moves, CSV reports."""

from __future__ import annotations

import csv
import errno
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from segd.state import fsops

SHM = Path("/dev/shm")


def names(name: str, count: int) -> list[str]:
    return list(itertools.islice(fsops.candidate_names(name), count))


def nbytes(name: str) -> int:
    return len(os.fsencode(name))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(fsops.TMP_PREFIX) for p in folder.iterdir())


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on a different filesystem from tmp_path (/dev/shm), or skip."""
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem: /dev/shm is missing or on the same device as tmp")
    folder = Path(tempfile.mkdtemp(prefix="segd-test-", dir=SHM))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- candidate_names


@pytest.mark.parametrize(("name", "expected"), [
    ("photo.jpg", ["photo.jpg", "photo (2).jpg", "photo (3).jpg"]),
    ("README", ["README", "README (2)", "README (3)"]),
    (".hidden", [".hidden", ".hidden (2)", ".hidden (3)"]),
    ("archive.tar.gz", ["archive.tar.gz", "archive.tar (2).gz", "archive.tar (3).gz"]),
    ("été à Nice.jpeg", ["été à Nice.jpeg", "été à Nice (2).jpeg", "été à Nice (3).jpeg"]),
])
def test_candidate_names_suffixes(name: str, expected: list[str]) -> None:
    assert names(name, 3) == expected


def test_candidate_names_are_all_distinct() -> None:
    got = names("x.jpg", 500)
    assert len(set(got)) == 500
    assert got[-1] == "x (500).jpg"


@pytest.mark.parametrize("char", ["a", "é", "日", "😀"])  # 1, 2, 3 and 4 bytes in UTF-8
def test_candidate_names_fit_255_bytes(char: str) -> None:
    long = char * 400 + ".jpg"
    for candidate in names(long, 12):
        assert nbytes(candidate) <= fsops.MAX_NAME_BYTES
    suffixed = names(long, 12)[1:]
    assert suffixed[0].endswith(" (2).jpg")
    assert suffixed[-1].endswith(" (12).jpg")


@pytest.mark.parametrize("char", ["é", "日", "😀"])
def test_candidate_names_trimmed_names_are_usable(tmp_path: Path, char: str) -> None:
    # Whatever the trimming did, the kernel must accept every candidate as a file name.
    for candidate in names(char * 400 + ".jpg", 3):
        (tmp_path / candidate).write_bytes(b"x")
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("char", ["é", "日", "😀"])
def test_candidate_names_never_split_a_multibyte_character(char: str) -> None:
    for candidate in names(char * 400 + ".jpg", 3):
        candidate.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate


def test_candidate_names_keep_the_extension_of_a_long_name() -> None:
    assert names("a" * 300 + ".jpg", 1)[0].endswith(".jpg")


def test_candidate_names_short_names_untouched() -> None:
    name = "x" * 251 + ".jpg"  # exactly 255 bytes
    assert names(name, 1) == [name]


# --------------------------------------------------------------------------- link_no_clobber


def test_link_no_clobber_free_name(tmp_path: Path) -> None:
    src = write(tmp_path / "a" / "img.jpg", b"new")
    dest = tmp_path / "b"
    dest.mkdir()
    got = fsops.link_no_clobber(src, dest, "img.jpg")
    assert got == dest / "img.jpg"
    assert os.path.samefile(got, src)


def test_link_no_clobber_never_overwrites(tmp_path: Path) -> None:
    src = write(tmp_path / "a" / "img.jpg", b"new")
    dest = tmp_path / "b"
    write(dest / "img.jpg", b"old one")
    write(dest / "img (2).jpg", b"old two")
    got = fsops.link_no_clobber(src, dest, "img.jpg")
    assert got == dest / "img (3).jpg"
    assert got.read_bytes() == b"new"
    assert (dest / "img.jpg").read_bytes() == b"old one"
    assert (dest / "img (2).jpg").read_bytes() == b"old two"


def test_link_no_clobber_treats_a_dangling_symlink_as_taken(tmp_path: Path) -> None:
    src = write(tmp_path / "a" / "img.jpg", b"new")
    dest = tmp_path / "b"
    dest.mkdir()
    (dest / "img.jpg").symlink_to(tmp_path / "nowhere")
    got = fsops.link_no_clobber(src, dest, "img.jpg")
    assert got == dest / "img (2).jpg"
    assert (dest / "img.jpg").is_symlink()


def test_link_no_clobber_without_hard_links(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # vfat and some FUSE mounts refuse link(2): the fallback renames, still never overwriting.
    def no_link(*_a: object, **_k: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    src = write(tmp_path / "a" / "img.jpg", b"new")
    dest = tmp_path / "b"
    write(dest / "img.jpg", b"old")
    monkeypatch.setattr(fsops.os, "link", no_link)
    got = fsops.link_no_clobber(src, dest, "img.jpg")
    assert got == dest / "img (2).jpg"
    assert got.read_bytes() == b"new"
    assert (dest / "img.jpg").read_bytes() == b"old"


def test_link_no_clobber_without_hard_links_keeps_a_dangling_symlink(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback's rename(2) would silently replace a symlink at the name, and a dangling
    # one does not "exist" to Path.exists(): it must still count as taken.
    def no_link(*_a: object, **_k: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    src = write(tmp_path / "a" / "img.jpg", b"new")
    dest = tmp_path / "b"
    dest.mkdir()
    (dest / "img.jpg").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(fsops.os, "link", no_link)
    got = fsops.link_no_clobber(src, dest, "img.jpg")
    assert got == dest / "img (2).jpg"
    assert got.read_bytes() == b"new"
    assert (dest / "img.jpg").is_symlink()
    assert os.readlink(dest / "img.jpg") == str(tmp_path / "nowhere")


def test_link_no_clobber_other_errors_propagate(tmp_path: Path) -> None:
    src = write(tmp_path / "a" / "img.jpg", b"new")
    with pytest.raises(FileNotFoundError):
        fsops.link_no_clobber(src, tmp_path / "missing-folder", "img.jpg")


# --------------------------------------------------------------------------- place_copy / move


def test_place_copy_keeps_source(tmp_path: Path) -> None:
    src = write(tmp_path / "src" / "img.jpg", b"payload")
    os.chmod(src, 0o640)
    folder = tmp_path / "dest" / "cluster-01"  # created on demand
    got = fsops.place_copy(src, folder, "img.jpg", tag="t1")
    assert got == folder / "img.jpg"
    assert got.read_bytes() == b"payload" and src.read_bytes() == b"payload"
    assert not os.path.samefile(got, src)  # a copy, not a second name
    assert os.stat(got).st_mode & 0o777 == 0o640
    assert os.stat(got).st_mtime_ns == os.stat(src).st_mtime_ns
    assert no_temp_files(folder)


def test_place_copy_collision(tmp_path: Path) -> None:
    src = write(tmp_path / "src" / "img.jpg", b"payload")
    folder = tmp_path / "dest"
    write(folder / "img.jpg", b"existing")
    got = fsops.place_copy(src, folder, "img.jpg", tag="t1")
    assert got == folder / "img (2).jpg"
    assert got.read_bytes() == b"payload"
    assert (folder / "img.jpg").read_bytes() == b"existing"
    assert no_temp_files(folder)


def test_place_move_same_fs(tmp_path: Path) -> None:
    src = write(tmp_path / "src" / "img.jpg", b"payload")
    ino = os.stat(src).st_ino
    folder = tmp_path / "dest"
    write(folder / "img.jpg", b"existing")
    got = fsops.place_move(src, folder, "img.jpg", tag="t1")
    assert got == folder / "img (2).jpg"
    assert not src.exists()
    assert os.stat(got).st_ino == ino  # a rename by link + unlink: same inode
    assert (folder / "img.jpg").read_bytes() == b"existing"


def test_place_move_across_filesystems(tmp_path: Path, other_fs: Path) -> None:
    src = write(other_fs / "img.jpg", b"payload" * 1000)
    folder = tmp_path / "dest"
    write(folder / "img.jpg", b"existing")
    got = fsops.place_move(src, folder, "img.jpg", tag="t1")
    assert got == folder / "img (2).jpg"
    assert got.read_bytes() == b"payload" * 1000
    assert not src.exists()
    assert (folder / "img.jpg").read_bytes() == b"existing"
    assert no_temp_files(folder)


def test_place_move_keeps_a_file_that_replaced_the_source(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Between the link and the unlink someone drops a new file under the source name.
    src = write(tmp_path / "src" / "img.jpg", b"first")
    real_link = fsops.link_no_clobber

    def link_then_replace(s: Path, folder: Path, name: str) -> Path:
        got = real_link(s, folder, name)
        s.unlink()
        s.write_bytes(b"second, dropped meanwhile")
        return got

    monkeypatch.setattr(fsops, "link_no_clobber", link_then_replace)
    got = fsops.place_move(src, tmp_path / "dest", "img.jpg", tag="t1")
    assert got.read_bytes() == b"first"
    assert src.read_bytes() == b"second, dropped meanwhile"


# --------------------------------------------------------------------------- remove_if_unchanged


def test_remove_if_unchanged_removes_the_same_file(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"data")
    assert fsops.remove_if_unchanged(path, os.lstat(path)) is True
    assert not path.exists()


def test_remove_if_unchanged_refuses_a_replaced_file(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"data")
    before = os.lstat(path)
    replacement = write(tmp_path / "g", b"data")  # same size, another inode
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    assert fsops.remove_if_unchanged(path, before) is False
    assert path.read_bytes() == b"data"


def test_remove_if_unchanged_spares_a_file_that_replaced_it_after_the_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer strikes between the check and the removal (here: just before the name is
    taken away): the newer file keeps its name and its bytes, only the checked one goes."""
    path = write(tmp_path / "f.jpg", b"the photo read")
    before = os.lstat(path)
    real_rename = os.rename

    def writer_strikes_first(src: Path, dst: Path) -> None:
        if Path(src) == path:
            replacement = write(tmp_path / "next.jpg", b"a newer photo")
            real_rename(replacement, path)
        real_rename(src, dst)

    monkeypatch.setattr(fsops.os, "rename", writer_strikes_first)
    assert fsops.remove_if_unchanged(path, before) is False
    assert path.read_bytes() == b"a newer photo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.jpg"]  # no private name left


def test_remove_if_unchanged_gives_a_replacement_the_next_free_name(tmp_path: Path) -> None:
    """A private name still holding a replacement, and the name taken again meanwhile."""
    path = write(tmp_path / "f.jpg", b"newest")
    hidden = write(fsops.hidden_name(path), b"newer")
    assert fsops.give_back(hidden, path) == tmp_path / "f (2).jpg"
    assert path.read_bytes() == b"newest" and (tmp_path / "f (2).jpg").read_bytes() == b"newer"
    assert not hidden.exists()


def test_remove_if_unchanged_refuses_a_rewritten_file(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"data")
    before = os.lstat(path)
    with path.open("ab") as fh:  # same inode, grown
        fh.write(b" and more")
    assert fsops.remove_if_unchanged(path, before) is False
    assert path.exists()


def test_remove_if_unchanged_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path / "f", b"data")
    before = os.lstat(path)
    path.unlink()
    assert fsops.remove_if_unchanged(path, before) is False


# --------------------------------------------------------------------------- write_csv_new


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.reader(fh))


def test_write_csv_new(tmp_path: Path) -> None:
    rows: list[list[object]] = [[Path("/a/b,c.jpg"), 1, 0.25], ["line\nbreak", "été", ""]]
    got = fsops.write_csv_new(tmp_path / "out", "report.csv", ["x", "y", "z"], rows)
    assert got == tmp_path / "out" / "report.csv"
    assert read_csv(got) == [["x", "y", "z"], ["/a/b,c.jpg", "1", "0.25"],
                             ["line\nbreak", "été", ""]]
    assert no_temp_files(tmp_path / "out")


def test_write_csv_new_never_overwrites(tmp_path: Path) -> None:
    write(tmp_path / "report.csv", b"earlier report\n")
    got = fsops.write_csv_new(tmp_path, "report.csv", ["h"], [["v"]])
    assert got == tmp_path / "report (2).csv"
    assert (tmp_path / "report.csv").read_bytes() == b"earlier report\n"
    assert read_csv(got) == [["h"], ["v"]]
    assert no_temp_files(tmp_path)


def test_write_csv_new_undecodable_name(tmp_path: Path) -> None:
    odd = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name on a UTF-8 system
    got = fsops.write_csv_new(tmp_path, "r.csv", ["source"], [[odd]])
    assert read_csv(got) == [["source"], [odd]]
