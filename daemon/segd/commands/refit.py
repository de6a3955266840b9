"""`segd refit`: re-cluster now, through the running daemon or, when none runs, directly."""

from __future__ import annotations

import argparse
import dataclasses

from segd.commands.options import check_root, parse_k, root_policy
from segd.config import Config
from segd.service import control


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("refit", parents=[common], help="re-cluster everything now")
    p.add_argument("--k", default=None, help="'auto' or a fixed number of clusters")
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.add_argument("--allow-root", action="store_true",
                   help="when no daemon runs, refit as root without the warning")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    return refit_command(config, k=parse_k(args.k, config.clustering.k), dry_run=args.dry_run,
                         allow_root=root_policy(config.allow_root, args.allow_root))


def refit_command(config: Config, *, k: int | str, dry_run: bool,
                  allow_root: bool | str) -> int:
    k_arg = k if isinstance(k, int) else None
    try:
        answer = control.request(config.socket_path,
                                 {"cmd": "refit", "k": k_arg, "dry_run": dry_run})
    except control.DaemonNotRunning:
        answer = None
    if answer is not None:
        if not answer.get("ok"):
            print(f"segd: the daemon refused the refit: {answer.get('error')}")
            return 1
        print(f"(asked the running daemon) {answer['summary']}")
        return 0

    check_root(allow_root, "refit the store")
    if not config.db_path.exists():
        print(f"segd: nothing to refit: no store at {config.db_path}")
        return 1
    # Only the direct refit needs the clustering stack.
    from segd.core.cluster import FitParams
    from segd.state.lock import acquire_state_lock
    from segd.state.refit import run_refit
    from segd.state.store import open_store

    with acquire_state_lock(config.lock_path, "refit"):
        store = open_store(config.db_path)
        try:
            params = FitParams.from_config(config.clustering)
            if isinstance(k, int):
                params = dataclasses.replace(params, k=k)
            report = run_refit(store, config, params, "segd refit", dry_run=dry_run)
        finally:
            store.close()
    print(report.summary())
    return 0
