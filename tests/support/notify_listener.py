"""A stand-in for systemd's notification socket: a real AF_UNIX datagram socket that keeps
every datagram the daemon sends, with the time it arrived.

Give the daemon ``NOTIFY_SOCKET=<listener.path>`` (DaemonProcess(extra_env=...)). An
`on_message` callback runs in the receiving thread the moment a datagram arrives: it is how
a test records what the daemon's log said at that instant (READY=1 must come after the
model line, not merely before the test looked).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Notification:
    at: float  # time.monotonic() on arrival
    fields: dict[str, str]  # KEY=VALUE lines
    raw: bytes
    seen: Any = field(default=None, compare=False)  # what on_message returned


def parse(raw: bytes) -> dict[str, str]:
    out = {}
    for line in raw.decode("utf-8").split("\n"):
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {line!r} in {raw!r}"
        out[key] = value
    return out


class NotifyListener:
    def __init__(self, on_message: Callable[[dict[str, str]], Any] | None = None) -> None:
        # A short folder of its own: sun_path holds at most 107 bytes.
        self.folder = Path(tempfile.mkdtemp(prefix="segd-notify-"))
        self.path = self.folder / "notify.sock"
        self.on_message = on_message
        self.messages: list[Notification] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(os.fspath(self.path))
        self._sock.settimeout(0.1)  # how often the thread looks at _stop
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._sock.recv(65536)
            except TimeoutError:
                continue
            at = time.monotonic()
            fields = parse(raw)
            seen = self.on_message(fields) if self.on_message else None
            with self._lock:
                self.messages.append(Notification(at, fields, raw, seen))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- looking at what came

    def snapshot(self) -> list[Notification]:
        with self._lock:
            return list(self.messages)

    def having(self, key: str, value: str | None = None, start: int = 0) -> list[Notification]:
        """Messages from index `start` on with `key` (equal to `value` when given)."""
        return [m for m in self.snapshot()[start:]
                if key in m.fields and (value is None or m.fields[key] == value)]

    def wait_for(self, key: str, value: str | None = None, start: int = 0,
                 timeout: float = 60) -> Notification:
        """The first message from index `start` on with `key` (= `value`), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.having(key, value, start)
            if found:
                return found[0]
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {key}={value or '*'} notification within {timeout:g} "
                                     f"s; got {[m.raw for m in self.snapshot()]}")
            time.sleep(0.05)

    def describe(self) -> str:
        return "\n".join(f"{m.at:.2f} {m.raw!r}" for m in self.snapshot())
