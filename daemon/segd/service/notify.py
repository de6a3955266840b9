"""The systemd notification protocol (sd_notify), spoken directly.

The protocol is small enough that a library would add a dependency for ten lines: one
datagram per message, ``KEY=VALUE`` lines separated by newlines, sent to the AF_UNIX
socket named by ``$NOTIFY_SOCKET``. A leading ``@`` names a socket in the Linux abstract
namespace (written with a leading NUL byte on the wire).

Every function here is a no-op returning False when segd does not run under systemd
(``$NOTIFY_SOCKET`` unset), and never raises on a failed send: the daemon keeps sorting
photos even if systemd went away or the socket vanished.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _address(raw: str) -> str | None:
    """The socket address to send to, or None when the variable names nothing usable."""
    if raw.startswith("@"):
        # Abstract namespace: the name is "\0" + the rest; Python passes it through as is.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # systemd also allows "vsock:" addresses for VMs; segd never runs that way, so we
    # ignore them rather than guess.
    return None


def notify(*lines: str) -> bool:
    """Send one notification made of ``lines``; True when the datagram went out."""
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", raw)
        return False
    payload = "\n".join(lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        # Debug only: a missing systemd is not the daemon's problem, and the watchdog ping
        # would otherwise flood the log every few seconds.
        log.debug("sd_notify to %r failed: %s", raw, exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Tell systemd start-up is complete (the model is loaded, the provider verified)."""
    if status is None:
        return notify("READY=1")
    return notify("READY=1", f"STATUS={_one_line(status)}")


def status(text: str) -> bool:
    """A one-line, human-readable status shown by ``systemctl status segd``."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    """Tell systemd a clean shutdown has begun (so a slow stop is not seen as a hang)."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """Tell systemd a configuration reload has begun; follow with ``ready()`` when done.

    ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, which ``time.monotonic`` reads on Linux) lets a
    ``Type=notify-reload`` unit tell this reload from an earlier one; older systemd ignores
    it."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_ping() -> bool:
    """Reset systemd's watchdog timer (``WatchdogSec=`` in the unit)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is armed for this process.

    systemd recommends pinging at half of ``$WATCHDOG_USEC`` so one late ping does not
    trigger a restart. ``$WATCHDOG_PID``, when set, names the process the watchdog is meant
    for; a child that inherited the environment must not ping on its parent's behalf.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


def _one_line(text: str) -> str:
    # A newline inside STATUS= would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.splitlines())
