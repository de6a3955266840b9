"""`segd undo`: reverse the last refit's moves and restore the clusters it replaced."""

from __future__ import annotations

import argparse

from segd.commands.options import root_policy
from segd.commands.writer import NoStore, ask_daemon, writing_store
from segd.config import Config


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("undo", parents=[common],
                       help="put back what the last refit moved, and its clusters")
    p.add_argument("--allow-root", action="store_true",
                   help="when no daemon runs, undo as root without the warning")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    return undo_command(config, allow_root=root_policy(config.allow_root, args.allow_root))


def undo_command(config: Config, *, allow_root: bool | str) -> int:
    """Through the running daemon when there is one, else directly under the store lock."""
    answer = ask_daemon(config, {"cmd": "undo"})
    if answer is not None:
        if not answer.get("ok"):
            print(f"segd: nothing was undone: {answer.get('error')}")
            return 1
        print(f"(asked the running daemon) {answer['summary']}")
        return 0

    from segd.state.undo import UndoRefused, undo_last_refit

    try:
        with writing_store(config, "undo", "undo a refit", allow_root) as store:
            report = undo_last_refit(store, config)
    except NoStore as exc:
        print(f"segd: {exc}")
        return 1
    except UndoRefused as exc:
        print(f"segd: nothing was undone: {exc}")
        return 1
    print(report.summary())
    return 0
