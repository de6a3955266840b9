"""`segd sort SRC DEST`: sort a folder once, without a daemon, and report what was done."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from segd.commands.options import parse_k
from segd.config import Config
from segd.core.errors import SegdError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    # The scientific stack loads here, not when the parser is built: `segd --help` and the
    # small commands stay instant.
    from segd.batch.sort import SortOptions, run_sort
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
