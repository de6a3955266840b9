"""The `segd` command: sort, run, refit, status, doctor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from segd import __version__
from segd.config import Config, load_config
from segd.core.errors import SegdError
from segd.service.privileges import refuse_root

log = logging.getLogger("segd")


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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="config file (default: $SEGD_CONFIG, ./config.yaml, "
                             "/etc/segd/config.yaml)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("sort", parents=[common], help="sort a folder of images into clusters",
                       description="Embed every image in SRC, choose k by the silhouette, and "
                                   "copy (or move) each image into DEST/cluster-NN/.")
    p.add_argument("src", type=Path, metavar="SRC")
    p.add_argument("dest", type=Path, metavar="DEST")
    p.add_argument("--k", default=None, help="'auto' (silhouette) or a number of clusters")
    p.add_argument("--k-min", type=int, default=None)
    p.add_argument("--k-max", type=int, default=None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--copy", dest="move", action="store_false", help="copy (the default)")
    mode.add_argument("--move", dest="move", action="store_true", help="move instead of copy")
    p.set_defaults(move=False)
    p.add_argument("--recursive", "-r", action="store_true", help="include subfolders of SRC")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write the silhouette curve (PNG)")
    p.add_argument("--overview", type=Path, metavar="FILE",
                   help="write a contact sheet of each cluster's most typical images (PNG/JPG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_sort)

    p = sub.add_parser("run", parents=[common], help="watch the inbox and sort arrivals")
    p.add_argument("--allow-root", action="store_true",
                   help="run even as root (not recommended, see README)")
    p.set_defaults(handler=_cmd_run)

    p = sub.add_parser("refit", parents=[common], help="re-cluster everything now")
    p.add_argument("--k", default=None, help="'auto' or a fixed number of clusters")
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.add_argument("--allow-root", action="store_true",
                   help="run even as root when no daemon is running")
    p.set_defaults(handler=_cmd_refit)

    p = sub.add_parser("status", parents=[common], help="show the daemon and the clusters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--overview", type=Path, metavar="FILE",
                   help="also write a contact sheet of the clusters (PNG/JPG)")
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("doctor", parents=[common],
                       help="check onnxruntime, the GPU and the model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_doctor)
    return parser


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


def _cmd_sort(args: argparse.Namespace, config: Config) -> int:
    import dataclasses

    from segd.commands.sort import SortOptions, run_sort
    from segd.core.cluster import FitParams
    from segd.media.decode import DecodeOptions
    from segd.media.embed import Embedder
    from segd.views.report import check_plotting_available, fit_table, plot_silhouette

    if args.plot:
        check_plotting_available()
    fit_params = FitParams.from_config(config.clustering)
    fit_params = dataclasses.replace(
        fit_params, k=parse_k(args.k, fit_params.k),
        k_min=args.k_min if args.k_min is not None else fit_params.k_min,
        k_max=args.k_max if args.k_max is not None else fit_params.k_max)
    if fit_params.k_min < 2 or fit_params.k_max < fit_params.k_min:
        raise SegdError("need 2 <= --k-min <= --k-max")
    embedder = Embedder.from_config(config.model)
    opts = SortOptions(
        src=args.src, dest=args.dest, move=args.move, recursive=args.recursive,
        fit=fit_params, batch_size=config.model.batch_size, workers=config.decode.workers,
        decode=DecodeOptions(resize=config.model.resize, max_pixels=config.decode.max_pixels),
        progress=not args.no_progress)
    result = run_sort(opts, embedder)

    chosen = result.fit.k if result.fit else len(result.sizes)
    print(fit_table(result.fit.scores if result.fit else {}, chosen, result.sizes))
    total = result.placed + len(result.unreadable)
    rate = total / result.embed_seconds if result.embed_seconds > 0 else 0.0
    verb = "moved" if args.move else "copied"
    print(f"\n{verb} {result.placed} images into {len(result.sizes)} folders in {args.dest} "
          f"({result.seconds:.1f} s, {rate:.1f} images/s embedded on "
          f"{embedder.report.summary})")
    if result.unreadable:
        print(f"{len(result.unreadable)} unreadable files set aside in "
              f"{args.dest / '_unreadable'} (reasons in reasons.csv):")
        for path, err in result.unreadable[:20]:
            print(f"  {path}: {err.kind}: {err.reason}")
        if len(result.unreadable) > 20:
            print(f"  ... and {len(result.unreadable) - 20} more")
    if args.plot and result.fit and result.fit.scores:
        plot_silhouette(result.fit.scores, chosen, args.plot,
                        title=f"silhouette for {args.src.name or args.src}")
        print(f"silhouette plot written to {args.plot}")
    if args.overview and result.samples:
        from segd.views.overview import ClusterSample, write_overview

        write_overview([ClusterSample(f, result.sizes[f], result.samples[f])
                        for f in result.sizes], args.overview)
        print(f"overview written to {args.overview}")
    return 0


def _cmd_run(args: argparse.Namespace, config: Config) -> int:
    from segd.service.daemon import run_daemon

    refuse_root(args.allow_root or config.allow_root, "run the daemon")
    return run_daemon(config)


def _cmd_refit(args: argparse.Namespace, config: Config) -> int:
    from segd.commands.admin import refit_command

    return refit_command(config, k=parse_k(args.k, config.clustering.k), dry_run=args.dry_run,
                         allow_root=args.allow_root or config.allow_root)


def _cmd_status(args: argparse.Namespace, config: Config) -> int:
    from segd.commands.admin import status_command

    return status_command(config, as_json=args.json, overview=args.overview)


def _cmd_doctor(args: argparse.Namespace, config: Config) -> int:
    from segd.commands.doctor import doctor_command

    return doctor_command(config, as_json=args.json)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
