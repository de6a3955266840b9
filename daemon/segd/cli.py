"""The `segd` command line: global options, then one subcommand from `segd.commands`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from segd import __version__
from segd.commands import doctor, explain, refit, run, sort, status, undo
from segd.commands.options import add_global_options, common_parent
from segd.config import load_config
from segd.core.errors import SegdError

COMMANDS = (sort, run, refit, undo, explain, status, doctor)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        config = load_config(args.config)
        setup_logging("DEBUG" if args.verbose else config.log_level)
        return int(args.handler(args, config) or 0)
    except SegdError as exc:
        print(f"segd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("segd: interrupted", file=sys.stderr)
        return 130


def setup_logging(level: str) -> None:
    # Under systemd (JOURNAL_STREAM is set) journald adds its own timestamps.
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, datefmt="%H:%M:%S", stream=sys.stderr,
                        force=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segd", description="A folder of photos that sorts itself by visual similarity.")
    parser.add_argument("--version", action="version", version=f"segd {__version__}")
    add_global_options(parser, suppress_defaults=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_parent()
    for command in COMMANDS:
        command.register(sub, common)
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
