"""`segd refit`: re-cluster now, through the running daemon or, when none runs, directly."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from segd.commands.options import parse_k, root_policy
from segd.commands.writer import NoStore, ask_daemon, writing_store
from segd.config import Config


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("refit", parents=[common], help="re-cluster everything now")
    p.add_argument("--k", default=None, help="'auto' or a fixed number of clusters")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing; list, per folder, the files that would move and where")
    p.add_argument("--json", action="store_true", help="print the refit's report as JSON")
    p.add_argument("--allow-root", action="store_true",
                   help="when no daemon runs, refit as root without the warning")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    # Only a k given here is the user's choice (it replaces the clusters); without one the
    # configured clustering.k applies and the refit policy decides.
    return refit_command(config, k=parse_k(args.k, "auto"), dry_run=args.dry_run,
                         allow_root=root_policy(config.allow_root, args.allow_root),
                         as_json=args.json)


def refit_command(config: Config, *, k: int | str, dry_run: bool,
                  allow_root: bool | str, as_json: bool = False) -> int:
    k_arg = k if isinstance(k, int) else None
    answer = ask_daemon(config, {"cmd": "refit", "k": k_arg, "dry_run": dry_run})
    if answer is not None:
        if not answer.get("ok"):
            print(f"segd: the daemon refused the refit: {answer.get('error')}")
            return 1
        _print_report(answer["refit"], f"(asked the running daemon) {answer['summary']}",
                      as_json)
        return 0

    # Only the direct refit needs the clustering stack.
    from segd.core.cluster import FitParams
    from segd.state.refit import run_refit

    params = FitParams.from_config(config.clustering)
    if isinstance(k, int):
        params = dataclasses.replace(params, k=k)
    try:
        with writing_store(config, "refit", "refit the store", allow_root) as store:
            report = run_refit(store, config, params, "segd refit", dry_run=dry_run,
                               forced=k_arg is not None)
    except NoStore as exc:
        print(f"segd: {exc}")
        return 1
    _print_report(report.to_dict(), report.summary(), as_json)
    return 0


def _print_report(report: Mapping[str, Any], summary: str, as_json: bool) -> None:
    """The summary once (or the whole report as JSON), then a dry run's planned moves."""
    if as_json:
        print(json.dumps(dict(report, summary=summary), indent=2))
        return
    print(summary)
    if report.get("dry_run"):
        for line in planned_listing(report.get("planned") or []):
            print(line)


def planned_listing(planned: Sequence[Mapping[str, str]]) -> list[str]:
    """A dry run's moves grouped by the folder each file is in now, in the report's order."""
    if not planned:
        return ["no file would move"]
    by_source: dict[str, list[Mapping[str, str]]] = {}
    for move in planned:
        by_source.setdefault(move["source"], []).append(move)
    lines = [f"would move {len(planned)} file(s):"]
    for source, moves in by_source.items():
        lines.append(f"  from {source} ({len(moves)}):")
        lines.extend(f"    {PurePath(m['path']).name} -> {m['target']}" for m in moves)
    return lines
