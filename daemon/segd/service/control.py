"""The daemon's local control socket: ``segd status`` and ``segd refit`` talk to it.

Transport: an AF_UNIX stream socket at ``<state_dir>/control.sock``, mode 0600. Protocol:
the client sends one JSON object on one line, the server answers with one JSON object on
one line and closes the connection. Requests::

    {"cmd": "ping"}
    {"cmd": "status"}
    {"cmd": "refit", "k": null | <int>, "dry_run": <bool>}
    {"cmd": "undo"}

Answers always carry ``"ok"``; a failure is ``{"ok": false, "error": "<message>"}``.
``ping`` is answered by the server itself; every other command goes to the handler the
daemon supplies, which may take as long as it needs (a refit runs for up to a minute):
each connection has its own thread, so a slow refit never blocks a ``status``.

When no daemon listens, `request` raises `DaemonNotRunning` (a ControlError), and the
command line does the work itself under the store lock instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segd.core.errors import ControlError, SegdError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]

MAX_REQUEST_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
COMMANDS: tuple[str, ...] = ("ping", "status", "refit", "undo")
# How long a connected client may take to send its request line. It bounds the threads a
# stuck or malicious local client can pin; it does not limit how long the handler runs.
REQUEST_READ_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
_SUN_PATH_MAX = 107  # sizeof(sun_path) is 108 on Linux, including the terminating NUL


class DaemonNotRunning(ControlError):
    """Nobody listens on the control socket: the caller may do the work itself."""


def check_request(message: object) -> dict[str, Any]:
    """The request if it is well formed; ControlError saying what is wrong otherwise."""
    if not isinstance(message, dict):
        raise ControlError("a request must be a JSON object")
    cmd = message.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError("a request needs a string 'cmd'")
    if cmd not in COMMANDS:
        raise ControlError(f"unknown command {cmd!r} (known: {', '.join(COMMANDS)})")
    if cmd == "refit":
        k = message.get("k")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ControlError("refit: 'k' must be null or a positive integer")
        if not isinstance(message.get("dry_run", False), bool):
            raise ControlError("refit: 'dry_run' must be true or false")
    return message


def peer_allowed(peer_uid: int, own_uid: int) -> bool:
    """Whether a client running as ``peer_uid`` may use a server running as ``own_uid``."""
    return peer_uid in (own_uid, 0)


class ControlServer:
    """Serve ``handler`` on a unix socket at ``path`` from a background thread."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._wake: tuple[int, int] | None = None  # a pipe that ends the accept wait
        self._thread: threading.Thread | None = None
        self._workers: set[threading.Thread] = set()
        self._workers_lock = threading.Lock()

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (mode 0600) and start accepting; ControlError if impossible."""
        if self._thread is not None:
            raise ControlError("the control server is already running")
        _check_path_length(self.path)
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # bind() creates the file with 0777 & ~umask. A umask of 0o177 makes it 0600 from
            # the first instant, leaving no window in which another user could connect; the
            # chmod afterwards covers platforms that ignore the umask for sockets. The umask
            # is process-wide, so this runs at start-up, before any worker creates files.
            old_umask = os.umask(0o177)
            try:
                sock.bind(os.fspath(self.path))
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(32)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot serve the control socket {self.path}: {exc}") from exc
        self._sock = sock
        self._wake = os.pipe2(os.O_CLOEXEC)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._accept_loop, name="segd-control", daemon=True
        )
        self._thread.start()
        log.debug("control socket listening on %s", self.path)

    def stop(self, wait_s: float = 5.0) -> None:
        """Stop accepting, remove the socket file, and give running requests ``wait_s``."""
        self._stop.set()
        if self._wake is not None:
            os.write(self._wake[1], b"x")
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._unlink_own_socket()
        with self._workers_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(wait_s)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _unlink_own_socket(self) -> None:
        # Remove the file only if it is still the one we bound: never somebody else's.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._inode:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._inode = None

    # -- serving ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None and self._wake is not None
        listener = self._sock
        # Waiting in poll() on the listener and a wake-up pipe lets stop() end the loop at
        # once, without racing a close() against a blocked accept(). poll, not select:
        # select fails on descriptors above 1023, which a busy daemon may well have.
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        while not self._stop.is_set():
            events = poller.poll()
            if not any(fd == listener.fileno() for fd, _ in events):
                continue
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ECONNABORTED):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors: wait
                    log.warning("control socket: %s", exc)
                    self._stop.wait(1.0)
                    continue
                log.error("control socket accept failed, no longer serving: %s", exc)
                return
            worker = threading.Thread(
                target=self._serve_connection, args=(conn,), name="segd-control-conn",
                daemon=True,
            )
            with self._workers_lock:
                self._workers.add(worker)
            worker.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                response = self._answer(conn)
                conn.settimeout(REQUEST_READ_TIMEOUT_S)
                try:
                    conn.sendall(_encode(response))
                except OSError as exc:  # the client gave up waiting; nothing to do
                    log.debug("control client went away before the answer: %s", exc)
        except Exception:  # a bug here must cost one request, never the server
            log.exception("control connection failed")
        finally:
            with self._workers_lock:
                self._workers.discard(threading.current_thread())

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        # The socket is 0600, which already keeps other users out on Linux. The uid check
        # is the second line: it still holds if the file's mode is loosened by hand, or if
        # the state folder is shared; root may always ask, as it could read the store
        # anyway. SO_PEERCRED reports the credentials the client had when it connected,
        # which the client cannot forge.
        uid = _peer_uid(conn)
        conn.settimeout(REQUEST_READ_TIMEOUT_S)
        problem = None
        raw = b""
        try:
            raw = _read_line(conn, MAX_REQUEST_BYTES)
        except TimeoutError:
            problem = "timed out waiting for the request line"
        except ControlError as exc:
            problem = str(exc)
        # Refused only once the request is read: a unix socket closed with unread data makes
        # the client's send fail (EPIPE) and its read too (ECONNRESET), so the client would
        # never learn why it was turned away.
        if uid is not None and not peer_allowed(uid, os.geteuid()):
            log.warning("control socket: refused a client running as uid %d", uid)
            return _error(f"permission denied: uid {uid} may not control this daemon")
        if problem is not None:
            return _error(problem)
        try:
            message = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            return _error(f"malformed request, expected one JSON object per line: {exc}")
        try:
            request = check_request(message)
        except ControlError as exc:
            return _error(str(exc))
        log.debug("control request %r from uid %s", request["cmd"], uid)
        if request["cmd"] == "ping":
            return {"ok": True, "pong": True, "pid": os.getpid()}
        # The handler runs without a timeout: a refit may take a minute and the client is
        # prepared to wait.
        conn.settimeout(None)
        try:
            response = self.handler(request)
        except SegdError as exc:
            log.info("control %s failed: %s", request["cmd"], exc)
            return _error(str(exc))
        except Exception as exc:
            log.exception("control %s raised", request["cmd"])
            return _error(str(exc) or type(exc).__name__)
        if not isinstance(response, dict):
            log.error("control handler returned %s, not a dict", type(response).__name__)
            return _error("internal error: the handler gave no answer")
        response.setdefault("ok", True)
        return response


def request(path: Path, message: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Send ``message`` to the daemon at ``path`` and return its answer.

    Raises DaemonNotRunning when nobody listens (no socket file, or a stale one), and
    ControlError for anything else (permission, timeout, a garbled answer). An answer with
    ``"ok": false`` is returned, not raised: the caller decides what to tell the user.
    """
    path = Path(path)
    _check_path_length(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        sock.settimeout(min(CONNECT_TIMEOUT_S, timeout))
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(
                f"no segd daemon is listening on {path} ({exc.strerror})"
            ) from exc
        except PermissionError as exc:
            raise ControlError(
                f"permission denied on {path}: run this as the daemon's user (or root)"
            ) from exc
        except TimeoutError as exc:
            # A full backlog: the daemon exists but is not accepting. Not "no daemon".
            raise ControlError(f"the daemon on {path} did not accept the connection") from exc
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc}") from exc
        sock.settimeout(timeout)
        try:
            sock.sendall(_encode(message))
            sock.shutdown(socket.SHUT_WR)  # tells the server the request is complete
            raw = _read_line(sock, MAX_RESPONSE_BYTES)
        except TimeoutError as exc:
            raise ControlError(f"the daemon gave no answer within {timeout:g} s") from exc
        except OSError as exc:
            raise ControlError(f"the control connection to {path} failed: {exc}") from exc
    if not raw:
        raise ControlError("the daemon closed the connection without an answer")
    try:
        answer = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ControlError(f"the daemon's answer is not valid JSON: {exc}") from exc
    if not isinstance(answer, dict):
        raise ControlError("the daemon's answer is not a JSON object")
    return answer


# -- helpers --------------------------------------------------------------------------


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _encode(message: dict[str, Any]) -> bytes:
    # default=str: a Path or datetime in a status answer must not turn into an error.
    return (json.dumps(message, default=str, separators=(",", ":")) + "\n").encode("utf-8")


def _read_line(sock: socket.socket, limit: int) -> bytes:
    """Bytes up to the first newline (or EOF); ControlError beyond ``limit`` bytes."""
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        newline = chunk.find(b"\n")
        if newline >= 0:
            buf += chunk[:newline]
            if len(buf) > limit:
                break
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            break
    raise ControlError(f"message larger than {limit} bytes")


def _peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):  # not Linux: rely on the socket's file mode alone
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _check_path_length(path: Path) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ControlError(
            f"socket path {path} is longer than {_SUN_PATH_MAX} bytes, the limit for unix "
            "sockets; choose a shorter state_dir"
        )


def _remove_stale_socket(path: Path) -> None:
    """Delete a socket file left by a killed daemon; refuse if someone still listens."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with probe:
        probe.settimeout(CONNECT_TIMEOUT_S)
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            pass  # nobody listens: the file is stale
        except FileNotFoundError:
            return  # vanished meanwhile
        except OSError as exc:
            raise ControlError(f"cannot tell whether {path} is in use: {exc}") from exc
        else:
            raise ControlError(f"another process is already listening on {path}")
    log.info("removing stale control socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
