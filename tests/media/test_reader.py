"""Tests for segd.media.reader: only regular files are read, boundedly, and never block."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from segd.core.errors import FileAccessError, ImageTooLargeError
from segd.media.reader import read_regular_file

LIMIT = 1 << 20
CONTENT = b"\xff\xd8\xff" + b"x" * 100


def regular(tmp_path: Path, name: str = "a.jpg", data: bytes = CONTENT) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_reads_bytes_and_the_stat_they_were_read_under(tmp_path: Path) -> None:
    path = regular(tmp_path)
    data, st = read_regular_file(path, LIMIT)
    assert data == CONTENT
    assert (st.st_ino, st.st_size) == (path.stat().st_ino, len(CONTENT))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.jpg"
    with pytest.raises(FileAccessError, match="does not exist") as info:
        read_regular_file(path, LIMIT)
    assert str(path) in str(info.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(FileAccessError, match="directory"):
        read_regular_file(tmp_path, LIMIT)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    with pytest.raises(FileAccessError, match="FIFO") as info:
        read_regular_file(path, LIMIT)
    assert str(path) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_swapped_in_after_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A regular file at stat time, a FIFO at open time: O_NONBLOCK keeps the open from hanging
    # and the fstat check rejects it.
    path = regular(tmp_path)
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(path))
    with pytest.raises(FileAccessError, match="FIFO"):
        read_regular_file(fifo, LIMIT)


def test_socket(tmp_path: Path) -> None:
    path = tmp_path / "s"
    if len(str(path)) > 100 or not hasattr(socket, "AF_UNIX"):
        pytest.skip("cannot bind a unix socket here")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(FileAccessError, match="socket"):
            read_regular_file(path, LIMIT)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_device_node() -> None:
    # /dev/zero would stream forever if it were read
    with pytest.raises(FileAccessError, match="character device"):
        read_regular_file("/dev/zero", LIMIT)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = regular(tmp_path, "secret.jpg")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        path.chmod(0)
    else:  # root ignores file modes: simulate the failure instead
        def deny(*_a: object, **_k: object) -> int:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(os, "open", deny)
    with pytest.raises(FileAccessError, match="permission denied") as info:
        read_regular_file(path, LIMIT)
    assert str(path) in str(info.value)


def test_symlinks_followed_or_refused(tmp_path: Path) -> None:
    target = regular(tmp_path, "real.jpg")
    link = tmp_path / "link.jpg"
    link.symlink_to(target)
    assert read_regular_file(link, LIMIT)[0] == CONTENT
    with pytest.raises(FileAccessError, match="symbolic link"):
        read_regular_file(link, LIMIT, follow_symlinks=False)
    dangling = tmp_path / "dangling.jpg"
    dangling.symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(FileAccessError, match="does not exist"):
        read_regular_file(dangling, LIMIT)


def test_symlink_swapped_in_after_stat_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A regular file at stat time, a symlink at open time: O_NOFOLLOW refuses it.
    outside = regular(tmp_path, "outside.jpg")
    link = tmp_path / "link.jpg"
    link.symlink_to(outside)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(outside))
    with pytest.raises(FileAccessError, match="cannot read"):
        read_regular_file(link, LIMIT, follow_symlinks=False)


def test_file_vanishing_between_stat_and_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = regular(tmp_path)
    real_stat = os.stat

    def stat_then_delete(p: object, *a: object, **k: object) -> os.stat_result:
        res = real_stat(p)  # type: ignore[arg-type]
        path.unlink()
        return res

    monkeypatch.setattr(os, "stat", stat_then_delete)
    with pytest.raises(FileAccessError, match="does not exist"):
        read_regular_file(path, LIMIT)


def test_size_limit(tmp_path: Path) -> None:
    assert read_regular_file(regular(tmp_path, "at.jpg", b"x" * 64), 64)[0] == b"x" * 64
    with pytest.raises(ImageTooLargeError, match="65 bytes, over the 64 byte limit"):
        read_regular_file(regular(tmp_path, "over.jpg", b"x" * 65), 64)


def test_file_grown_after_stat_is_read_only_up_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = regular(tmp_path, "small.jpg", b"x" * 10)
    big = regular(tmp_path, "big.jpg", b"x" * 1000)
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(small))
    with pytest.raises(ImageTooLargeError, match="over the 64 byte limit"):
        read_regular_file(big, 64)
