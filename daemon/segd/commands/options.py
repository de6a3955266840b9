"""What every command shares: the global options, `--k` parsing and the root policy."""

from __future__ import annotations

import argparse
import logging
import os

from segd.core.errors import SegdError

log = logging.getLogger("segd")


def add_global_options(parser: argparse.ArgumentParser, *, suppress_defaults: bool) -> None:
    """``--config`` and ``-v``, accepted before the command and after it.

    The copy on each subcommand leaves the attribute alone unless given (SUPPRESS), so
    ``segd --config a.yaml sort ...`` and ``segd sort --config a.yaml ...`` both work and
    one given after the command wins.
    """
    default = argparse.SUPPRESS if suppress_defaults else None
    parser.add_argument("--config", metavar="FILE", default=default,
                        help="config file (default: $SEGD_CONFIG, ./config.yaml, "
                             "/etc/segd/config.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        default=argparse.SUPPRESS if suppress_defaults else False,
                        help="debug logging")


def common_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    add_global_options(parent, suppress_defaults=True)
    return parent


def parse_k(value: str | None, default: int | str) -> int | str:
    if value is None:
        return default
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise SegdError(f"--k must be 'auto' or a number, got {value!r}") from None
    if k < 1:
        raise SegdError("--k must be at least 1")
    return k


def root_policy(configured: bool | str, flag: bool) -> bool | str:
    """The effective `allow_root`: ``--allow-root`` beats $SEGD_ALLOW_ROOT beats the config."""
    if flag:
        return True
    env = os.environ.get("SEGD_ALLOW_ROOT")
    if env is not None:
        words = {"1": True, "true": True, "0": False, "false": False, "warn": "warn"}
        if env.lower() not in words:
            raise SegdError(f"SEGD_ALLOW_ROOT must be 1, 0 or warn, got {env!r}")
        return words[env.lower()]
    return configured


def check_root(policy: bool | str, what: str, *, euid: int | None = None) -> None:
    """Run as root only as the policy says: refuse (false), warn loudly (warn), or run (true).

    Root is not refused by default: containers, CI and many home servers run everything as
    root, and the main command must run there. The warning says what is at stake; the
    systemd unit runs as its own user and sets SEGD_ALLOW_ROOT=0 to make root an error.
    """
    if (os.geteuid() if euid is None else euid) != 0 or policy is True:
        return
    risk = ("segd moves files and parses untrusted images, so a bug or a malicious file "
            "would act with full rights, and the files it creates belong to root")
    if policy is False:
        raise SegdError(
            f"refusing to {what} as root (allow_root: false): {risk}. Run it as a dedicated "
            "user (see systemd/segd.service), or pass --allow-root (or set allow_root: true, "
            "or SEGD_ALLOW_ROOT=1) if you must.")
    log.warning("running as ROOT to %s: %s. Run it as its own user (see docs/systemd.md); "
                "set allow_root: true to silence this, or false to refuse.", what, risk)
