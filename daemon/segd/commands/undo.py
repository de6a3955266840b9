"""`segd undo`: reverse the last refit's moves and restore the clusters it replaced."""

from __future__ import annotations

import argparse

from segd.commands.options import check_root, root_policy
from segd.config import Config
from segd.service import control


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
    try:
        answer = control.request(config.socket_path, {"cmd": "undo"})
    except control.DaemonNotRunning:
        answer = None
    if answer is not None:
        if not answer.get("ok"):
            print(f"segd: nothing was undone: {answer.get('error')}")
            return 1
        print(f"(asked the running daemon) {answer['summary']}")
        return 0

    check_root(allow_root, "undo a refit")
    if not config.db_path.exists():
        print(f"segd: nothing to undo: no store at {config.db_path}")
        return 1
    from segd.state.lock import acquire_state_lock
    from segd.state.store import open_store
    from segd.state.undo import UndoRefused, undo_last_refit

    with acquire_state_lock(config.lock_path, "undo"):
        store = open_store(config.db_path)
        try:
            report = undo_last_refit(store, config)
        except UndoRefused as exc:
            print(f"segd: nothing was undone: {exc}")
            return 1
        finally:
            store.close()
    print(report.summary())
    return 0
