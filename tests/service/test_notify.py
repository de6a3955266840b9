"""sd_notify against a real datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from segd.service import notify


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    with sock:
        yield sock


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_ready_sends_exactly_ready(listener: socket.socket) -> None:
    assert notify.ready() is True
    assert received(listener) == b"READY=1"


def test_ready_with_status_is_one_datagram(listener: socket.socket) -> None:
    assert notify.ready("sorting 3 clusters") is True
    assert received(listener) == b"READY=1\nSTATUS=sorting 3 clusters"


def test_status(listener: socket.socket) -> None:
    assert notify.status("refit: 1200 images, k=5") is True
    assert received(listener) == b"STATUS=refit: 1200 images, k=5"


def test_status_newlines_cannot_inject_assignments(listener: socket.socket) -> None:
    notify.status("line one\nWATCHDOG=trigger")
    assert received(listener) == b"STATUS=line one WATCHDOG=trigger"


def test_watchdog_and_stopping(listener: socket.socket) -> None:
    assert notify.watchdog_ping() is True
    assert received(listener) == b"WATCHDOG=1"
    assert notify.stopping() is True
    assert received(listener) == b"STOPPING=1"
    before = time.monotonic_ns() // 1000
    assert notify.reloading() is True
    after = time.monotonic_ns() // 1000
    reload_msg = received(listener)
    head, stamp = reload_msg.split(b"\n")
    assert head == b"RELOADING=1"
    assert stamp.startswith(b"MONOTONIC_USEC=")
    assert before <= int(stamp.removeprefix(b"MONOTONIC_USEC=")) <= after


def test_notify_joins_lines(listener: socket.socket) -> None:
    assert notify.notify("STATUS=x", "MAINPID=42") is True
    assert received(listener) == b"STATUS=x\nMAINPID=42"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"segd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_unset_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    assert notify.watchdog_ping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify.status("x") is False


def test_send_failure_returns_false_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("60000000", None, 30.0),
        ("60000000", "self", 30.0),
        ("60000000", "other", None),
        ("1000", None, 0.0005),
        ("0", None, None),
        ("junk", None, None),
        ("60000000", "junk", None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)
    assert notify.watchdog_interval() == expected
