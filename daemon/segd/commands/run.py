"""`segd run`: the daemon, as the systemd service runs it."""

from __future__ import annotations

import argparse

from segd.commands.options import check_root, root_policy
from segd.config import Config


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="watch the inbox and sort arrivals")
    p.add_argument("--allow-root", action="store_true",
                   help="run as root without the warning (see README)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    check_root(root_policy(config.allow_root, args.allow_root), "run the daemon")
    from segd.service.daemon import run_daemon

    return run_daemon(config)
