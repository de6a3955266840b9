"""The control socket: a real unix socket in tmp_path, a real server thread."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import python_as

from segd.core.errors import ControlError, StoreError
from segd.service import control
from segd.service.control import (
    ControlServer,
    DaemonNotRunning,
    check_request,
    peer_allowed,
    request,
)


def echo_handler(message: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "echo": message}


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "control.sock"


@pytest.fixture
def server(sock_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(sock_path, echo_handler)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def raw_exchange(path: Path, payload: bytes) -> bytes:
    """Send raw bytes (possibly not JSON) and return the raw answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_round_trip(server: ControlServer, sock_path: Path) -> None:
    msg = {"cmd": "refit", "k": 4, "dry_run": True}
    assert request(sock_path, msg, timeout=10) == {"ok": True, "echo": msg}
    assert request(sock_path, {"cmd": "status"}, timeout=10)["echo"] == {"cmd": "status"}


def test_ping_is_answered_by_the_server(sock_path: Path) -> None:
    def handler(message: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("ping must not reach the handler")

    with ControlServer(sock_path, handler):
        answer = request(sock_path, {"cmd": "ping"}, timeout=10)
    assert answer["ok"] is True
    assert answer["pong"] is True


def test_answer_is_one_json_line(server: ControlServer, sock_path: Path) -> None:
    raw = raw_exchange(sock_path, b'{"cmd": "ping"}\n')
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1


def test_socket_mode_is_0600(server: ControlServer, sock_path: Path) -> None:
    st = sock_path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_stop_removes_the_socket(sock_path: Path) -> None:
    srv = ControlServer(sock_path, echo_handler)
    srv.start()
    assert sock_path.exists()
    srv.stop()
    assert not sock_path.exists()
    with pytest.raises(DaemonNotRunning):
        request(sock_path, {"cmd": "ping"}, timeout=5)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"this is not json\n", "malformed request"),
        (b"\xff\xfe\n", "malformed request"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"k": 3}\n', "'cmd'"),
        (b'{"cmd": "format-disk"}\n', "unknown command"),
        (b'{"cmd": "refit", "k": "five"}\n', "'k'"),
        (b'{"cmd": "refit", "k": 0}\n', "'k'"),
        (b'{"cmd": "refit", "k": true}\n', "'k'"),
        (b'{"cmd": "refit", "dry_run": "yes"}\n', "'dry_run'"),
        (b"", "malformed request"),
    ],
)
def test_malformed_requests_get_an_error_answer(
    server: ControlServer, sock_path: Path, payload: bytes, fragment: str
) -> None:
    answer = json.loads(raw_exchange(sock_path, payload))
    assert answer["ok"] is False
    assert fragment in answer["error"]
    # The server survived and still answers.
    assert request(sock_path, {"cmd": "ping"}, timeout=10)["ok"] is True


def test_oversized_request_is_refused(server: ControlServer, sock_path: Path) -> None:
    big = b'{"cmd": "status", "pad": "' + b"x" * (control.MAX_REQUEST_BYTES + 10) + b'"}\n'
    answer = json.loads(raw_exchange(sock_path, big))
    limit = control.MAX_REQUEST_BYTES
    assert answer == {"ok": False, "error": f"message larger than {limit} bytes"}


def test_request_without_trailing_newline_is_accepted(
    server: ControlServer, sock_path: Path
) -> None:
    answer = json.loads(raw_exchange(sock_path, b'{"cmd": "status"}'))
    assert answer == {"ok": True, "echo": {"cmd": "status"}}


def test_handler_exception_becomes_an_error_answer(sock_path: Path) -> None:
    calls = []

    def handler(message: dict[str, Any]) -> dict[str, Any]:
        calls.append(message)
        if len(calls) == 1:
            raise RuntimeError("the model went away")
        if len(calls) == 2:
            raise StoreError("the store is in use")
        if len(calls) == 3:
            return "not a dict"  # type: ignore[return-value]
        return {"state": "fine"}  # "ok" is filled in

    with ControlServer(sock_path, handler):
        assert request(sock_path, {"cmd": "status"}, timeout=10) == {
            "ok": False, "error": "the model went away"}
        assert request(sock_path, {"cmd": "status"}, timeout=10) == {
            "ok": False, "error": "the store is in use"}
        assert request(sock_path, {"cmd": "status"}, timeout=10)["ok"] is False
        assert request(sock_path, {"cmd": "status"}, timeout=10) == {"ok": True, "state": "fine"}


def test_slow_handler_is_waited_for(sock_path: Path) -> None:
    def handler(message: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.5)  # the client keeps waiting while the handler works
        return {"ok": True, "refitted": True}

    with ControlServer(sock_path, handler):
        answer = request(sock_path, {"cmd": "refit", "k": None, "dry_run": False}, timeout=30)
    assert answer == {"ok": True, "refitted": True}


def test_client_timeout_is_a_control_error(sock_path: Path) -> None:
    # The handler holds the answer until the client has given up, so the client's timeout
    # is what ends the wait; the request itself must have got through (connect, send) and
    # reached the handler, so the error is about the answer, whatever the machine's load.
    reached = threading.Event()
    release = threading.Event()

    def handler(message: dict[str, Any]) -> dict[str, Any]:
        reached.set()
        release.wait(30)
        return {"ok": True}

    with ControlServer(sock_path, handler):
        try:
            with pytest.raises(ControlError, match="no answer within 1 s") as info:
                request(sock_path, {"cmd": "status"}, timeout=1)
            assert not isinstance(info.value, DaemonNotRunning)
            assert reached.wait(30), "the request never reached the handler"
        finally:
            release.set()


def test_no_daemon_no_socket_file(sock_path: Path) -> None:
    with pytest.raises(DaemonNotRunning, match="no segd daemon is listening"):
        request(sock_path, {"cmd": "status"})


def test_no_daemon_stale_socket_file(sock_path: Path) -> None:
    make_stale_socket(sock_path)
    with pytest.raises(DaemonNotRunning):
        request(sock_path, {"cmd": "status"})


def make_stale_socket(path: Path) -> None:
    # What a SIGKILLed daemon leaves behind: the file, with nobody listening.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    assert path.exists()


def test_stale_socket_file_is_replaced(sock_path: Path) -> None:
    make_stale_socket(sock_path)
    with ControlServer(sock_path, echo_handler):
        assert request(sock_path, {"cmd": "ping"}, timeout=10)["ok"] is True


def test_live_socket_is_not_taken_over(server: ControlServer, sock_path: Path) -> None:
    with pytest.raises(ControlError, match="already listening"):
        ControlServer(sock_path, echo_handler).start()
    # The first server is untouched.
    assert request(sock_path, {"cmd": "ping"}, timeout=10)["ok"] is True


def test_non_socket_file_is_never_deleted(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(sock_path, echo_handler).start()
    assert sock_path.read_text() == "precious"


def test_too_long_path_is_a_clear_error(tmp_path: Path) -> None:
    long_path = tmp_path / ("d" * 120) / "control.sock"
    with pytest.raises(ControlError, match="longer than"):
        ControlServer(long_path, echo_handler).start()
    with pytest.raises(ControlError, match="longer than"):
        request(long_path, {"cmd": "ping"})


def test_concurrent_clients_are_served_in_parallel(sock_path: Path) -> None:
    clients = 8
    # Every handler waits for all the others: this only passes if the server runs the
    # requests at the same time, one thread per connection.
    barrier = threading.Barrier(clients, timeout=10)

    def handler(message: dict[str, Any]) -> dict[str, Any]:
        barrier.wait()
        return {"ok": True, "n": message["n"]}

    with ControlServer(sock_path, handler), ThreadPoolExecutor(clients) as pool:
        futures = [
            pool.submit(request, sock_path, {"cmd": "status", "n": i}, 30)
            for i in range(clients)
        ]
        answers = [f.result() for f in futures]
    assert sorted(a["n"] for a in answers) == list(range(clients))
    assert all(a["ok"] for a in answers)


def test_status_answers_while_a_refit_runs(sock_path: Path) -> None:
    refit_running = threading.Event()
    finish_refit = threading.Event()

    def handler(message: dict[str, Any]) -> dict[str, Any]:
        if message["cmd"] == "refit":
            refit_running.set()
            finish_refit.wait(10)
            return {"ok": True, "refit": "done"}
        return {"ok": True, "state": "refitting" if refit_running.is_set() else "idle"}

    with ControlServer(sock_path, handler), ThreadPoolExecutor(1) as pool:
        refit = pool.submit(request, sock_path, {"cmd": "refit", "k": None, "dry_run": False})
        assert refit_running.wait(10)
        assert request(sock_path, {"cmd": "status"}, timeout=10)["state"] == "refitting"
        finish_refit.set()
        assert refit.result(timeout=10)["refit"] == "done"


# ---- who may connect: SO_PEERCRED of real connections from other users (tests run as root)

# A request from a process of its own, printing the answer (or the client's error) as JSON.
CLIENT = """
import json, sys
from segd.service import control
try:
    print(json.dumps(control.request(sys.argv[1], {"cmd": "status"}, timeout=30)))
except control.ControlError as exc:
    print(json.dumps({"client_error": str(exc)}))
"""

# A server of its own, answering with the uid it runs as; the socket is opened to everyone
# by hand (mode 0666), so only the uid check stands between another user and the daemon.
SERVER = """
import os, sys
from segd.service.control import ControlServer
srv = ControlServer(sys.argv[1], lambda m: {"ok": True, "echo": m, "server_uid": os.geteuid()})
srv.start()
os.chmod(sys.argv[1], 0o666)
print("ready", flush=True)
sys.stdin.read()
srv.stop()
"""

USER_A = (54321, 54331)  # uid, gid: no such user needs to exist
USER_B = (54322, 54332)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users can reach (pytest's tmp_path is 0700 root)."""
    folder = Path(tempfile.mkdtemp(prefix="segd-ctl-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def ask_as(run_as: tuple[int, int], path: Path) -> dict[str, Any]:
    client = python_as(run_as, CLIENT, str(path), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    return json.loads(out)


def test_another_users_connection_is_refused_by_its_credentials(shared_dir: Path) -> None:
    calls: list[dict[str, Any]] = []

    def handler(message: dict[str, Any]) -> dict[str, Any]:
        calls.append(message)
        return {"ok": True}

    path = shared_dir / "control.sock"
    with ControlServer(path, handler):
        os.chmod(path, 0o666)  # loosened by hand: the mode no longer keeps anyone out
        answer = ask_as(USER_A, path)
        assert answer == {"ok": False, "error":
                          f"permission denied: uid {USER_A[0]} may not control this daemon"}
        assert calls == []
        assert request(path, {"cmd": "status"}, timeout=30) == {"ok": True}  # root, ours
    assert calls == [{"cmd": "status"}]


def test_same_user_and_root_are_accepted_others_refused(shared_dir: Path) -> None:
    """A server running as user A answers user A and root, and refuses user B."""
    os.chown(shared_dir, *USER_A)
    path = shared_dir / "control.sock"
    server = python_as(USER_A, SERVER, str(path), stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready", (
            server.stderr.read() if server.stderr else "")
        assert path.stat().st_uid == USER_A[0]
        same = ask_as(USER_A, path)
        assert same == {"ok": True, "echo": {"cmd": "status"}, "server_uid": USER_A[0]}
        assert request(path, {"cmd": "status"}, timeout=30)["server_uid"] == USER_A[0]
        other = ask_as(USER_B, path)
        assert other == {"ok": False, "error":
                         f"permission denied: uid {USER_B[0]} may not control this daemon"}
    finally:
        server.communicate("", timeout=60)
    assert server.returncode == 0


def test_peer_allowed() -> None:
    assert peer_allowed(1000, 1000)
    assert peer_allowed(0, 1000)  # root may always ask
    assert not peer_allowed(1001, 1000)
    assert peer_allowed(0, 0)
    assert not peer_allowed(1000, 0)  # a root daemon answers only root


def test_check_request_accepts_the_protocol() -> None:
    for msg in ({"cmd": "ping"}, {"cmd": "status"}, {"cmd": "refit", "k": None,
                "dry_run": False}, {"cmd": "refit", "k": 7, "dry_run": True}):
        assert check_request(msg) is msg
