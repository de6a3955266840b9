"""`segd sort SRC DEST`: sort a folder once, without a daemon, and report what was done."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from segd.commands.options import parse_k
from segd.core.errors import SegdError

if TYPE_CHECKING:
    from segd.batch.sort import SortResult
    from segd.config import Config
    from segd.core.cluster import FitParams

CACHE_MAX_MB = 2048  # the embedding cache's default bound (--cache-max-mb)


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
    p.add_argument("--no-cache", action="store_true",
                   help="embed every image afresh: neither read nor write the embedding cache "
                        "($XDG_CACHE_HOME/segd), nor read the daemon's store")
    p.add_argument("--cache-max-mb", type=int, default=CACHE_MAX_MB, metavar="MB",
                   help=f"bound of the embedding cache, least recently used evicted "
                        f"(default {CACHE_MAX_MB})")
    # The Ray engine (segd.batch.ray_engine, docs/scale.md): the optional extra `segd[ray]`.
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="embed here (default) or on a Ray cluster (pip install 'segd[ray]')")
    p.add_argument("--address", metavar="HOST:PORT",
                   help="with --engine ray: the cluster's head (default: start Ray here)")
    p.add_argument("--shard-size", type=int, metavar="N",
                   help="with --engine ray: files per unit of work (default 2000)")
    p.add_argument("--actor-cpus", type=int, metavar="N",
                   help="with --engine ray: CPUs per embedding actor on CPU nodes")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    # Neither the clustering stack nor onnxruntime loads here: decoding starts first, the
    # network loads (in the background) only if some image is not in the cache, and
    # scikit-learn after it (segd.batch.sort). `segd --help` and the small commands stay
    # instant.
    from segd.batch.known import ModelFile, ReuseOptions, cache_key
    from segd.batch.sort import SortOptions, run_sort
    from segd.media.decode import DecodeOptions
    from segd.media.embed import Embedder
    from segd.state.cache import default_cache_path
    from segd.views.report import check_plotting_available

    if args.plot:
        check_plotting_available()
    c = config.clustering
    k = parse_k(args.k, c.k)
    k_min = args.k_min if args.k_min is not None else c.k_min
    k_max = args.k_max if args.k_max is not None else c.k_max
    if k_min < 2 or k_max < k_min:
        raise SegdError("need 2 <= --k-min <= --k-max")
    if args.cache_max_mb < 1:
        raise SegdError("--cache-max-mb must be at least 1")

    def fit_params() -> FitParams:
        from segd.core.cluster import FitParams

        return dataclasses.replace(FitParams.from_config(c), k=k, k_min=k_min, k_max=k_max)

    reuse = ReuseOptions() if args.no_cache else ReuseOptions(
        cache_path=default_cache_path(), cache_max_bytes=args.cache_max_mb * 2**20,
        store_path=config.db_path)
    # Read once: the cache key's hash, and the input side the decoders need before the
    # network has loaded.
    model = ModelFile.read(config.model)
    key = cache_key(config.model, config.decode.max_pixels, model.sha256)
    opts = SortOptions(
        src=args.src, dest=args.dest, move=args.move, recursive=args.recursive,
        fit=fit_params, batch_size=config.model.batch_size, workers=config.decode.workers,
        decode=DecodeOptions(resize=config.model.resize, max_pixels=config.decode.max_pixels),
        progress=not args.no_progress, reuse=reuse)
    if args.engine == "local" and (args.address or args.shard_size or args.actor_cpus):
        raise SegdError("--address, --shard-size and --actor-cpus go with --engine ray")
    if args.engine == "ray":
        from segd.batch.ray_engine import ray_options, run_sort_ray

        result = run_sort_ray(opts, config.model, ray_options(args))
    else:
        result = run_sort(opts, lambda: Embedder.from_config(config.model), key, model.input_size)
    report(args, result)
    return 0


def report(args: argparse.Namespace, result: SortResult) -> None:
    from segd.views.report import fit_table, plot_scores, score_name

    print(fit_table(result.fit, result.sizes))
    total = result.placed + len(result.unreadable)
    verb = "moved" if args.move else "copied"
    print(f"\n{verb} {result.placed} images into {len(result.sizes)} folders in {args.dest} "
          f"({result.seconds:.1f} s, {embedding_summary(result, total)})")
    if result.unreadable:
        print(f"{len(result.unreadable)} unreadable files set aside in "
              f"{args.dest / '_unreadable'} (reasons in reasons.csv):")
        for path, err in result.unreadable[:20]:
            print(f"  {path}: {err.kind}: {err.reason}")
        if len(result.unreadable) > 20:
            print(f"  ... and {len(result.unreadable) - 20} more")
    if args.plot and result.fit and result.fit.scores:
        name = score_name(result.fit.rule)
        plot_scores(result.fit.scores, result.fit.k, args.plot, rule=result.fit.rule,
                    title=f"{name} for {args.src.name or args.src}")
        print(f"{name} plot written to {args.plot}")
    if args.overview and result.samples:
        from segd.views.overview import ClusterSample, write_overview

        write_overview([ClusterSample(f, result.sizes[f], result.samples[f])
                        for f in result.sizes], args.overview)
        print(f"overview written to {args.overview}")


def embedding_summary(result: SortResult, total: int) -> str:
    """Where the embeddings came from: the network's rate, the cache, the daemon's store."""
    reused = result.cached + result.from_store
    parts = []
    if result.device is not None and (result.embedded or not reused):
        computed = total - reused
        rate = computed / result.embed_seconds if result.embed_seconds > 0 else 0.0
        parts.append(f"{rate:.1f} images/s embedded on {result.device}")
    if result.cached:
        parts.append(f"{result.cached} embeddings from the cache")
    if result.from_store:
        parts.append(f"{result.from_store} from the daemon's store")
    return "; ".join(parts) or "nothing to embed"
