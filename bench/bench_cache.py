"""The embedding cache: `segd sort` run again with another k, against its first run.

    .venv/bin/python bench/bench_cache.py [--data DIR] [--limit N] [--k K] [--no-baseline]

Images: the "distinct five" of clothing10 (949 photos), or every image under DIR, staged
into one folder and read once so both runs see a warm page cache. The cache is a fresh one
under a temporary $XDG_CACHE_HOME, so the first run starts from nothing.

    (1) `segd sort SRC DEST1` (k auto): every image decoded and embedded, the cache filled
    (2) `segd sort SRC DEST2 --k K`: the user's second try; every vector from the cache
    (3) the same with --no-cache, what (2) cost before the cache (skip: --no-baseline)

Each run is a child process: wall time from start to exit, and from segd's own debug log
the seconds until every embedding was ready (the phase the cache replaces). Printed: both
times for each run and the ratios (1)/(2) and (3)/(2), and, for scale, the time an
interpreter takes to import the clustering stack alone. The goal is (1)/(2) >= 20.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

READY = re.compile(r"embeddings ready ([0-9.]+) s after the sort started: (\d+) embedded, "
                   r"(\d+) from the cache")


def sort(src: Path, dest: Path, config: Path, env: dict[str, str], n: int,
         *extra: str) -> tuple[float, float, int, int]:
    """(wall s, embedding phase s, embedded, from the cache) of one `segd sort`."""
    run = benchlib.run_child([str(benchlib.SEGD), "sort", str(src), str(dest), "--config",
                              str(config), "--no-progress", "-v", *extra], env=env)
    if run.returncode != 0:
        raise SystemExit(f"segd sort failed ({run.returncode}):\n{run.stderr[-3000:]}")
    placed = sum(1 for p in dest.rglob("*") if p.is_file() and p.suffix != ".csv")
    if placed != n:
        raise SystemExit(f"segd sort placed {placed} of {n} images")
    m = READY.search(run.stderr)
    if m is None:
        raise SystemExit("segd sort did not log when its embeddings were ready")
    return run.wall_s, float(m.group(1)), int(m.group(2)), int(m.group(3))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="folder of images (default: the distinct five of clothing10)")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--k", type=int, default=4, help="the k of the second run")
    ap.add_argument("--gpu", default="off", choices=("off", "preferred"),
                    help="model.gpu for the runs (default off: no GPU build here)")
    ap.add_argument("--no-baseline", action="store_true", help="skip run (3)")
    args = ap.parse_args()

    files = benchlib.list_images(args.data, args.limit)
    n = len(files)
    print(f"machine: {benchlib.machine()}; load average {benchlib.load_average()}")
    print(f"images: {n} from {args.data or 'clothing10 distinct five'}")
    with tempfile.TemporaryDirectory(prefix="segd-bench-cache-") as tmp:
        work = Path(tmp)
        src = benchlib.stage_flat(files, work / "src")
        benchlib.warm_page_cache(list(src.iterdir()))
        config = work / "config.yaml"
        config.write_text(f'model:\n  gpu: "{args.gpu}"\nstate_dir: {work / "state"}\n')
        env = dict(os.environ, XDG_CACHE_HOME=str(work / "xdg"))

        rows = [("(1) first run, k auto", sort(src, work / "d1", config, env, n))]
        rows.append((f"(2) again, --k {args.k}",
                     sort(src, work / "d2", config, env, n, "--k", str(args.k))))
        if not args.no_baseline:
            rows.append((f"(3) again, --k {args.k} --no-cache",
                         sort(src, work / "d3", config, env, n, "--k", str(args.k),
                              "--no-cache")))
        cache = work / "xdg" / "segd" / "embeddings.sqlite"
        size_mb = cache.stat().st_size / 2**20

    print(f"\n{'run':<32} {'wall s':>8} {'embeddings s':>13} {'embedded':>9} {'cached':>7}")
    for name, (wall, ready, embedded, cached) in rows:
        print(f"{name:<32} {wall:8.2f} {ready:13.3f} {embedded:9d} {cached:7d}")
    (w1, r1, _, _), (w2, r2, _, cached2) = rows[0][1], rows[1][1]
    print(f"\nfirst run / re-run:  {w1 / w2:5.1f}x whole process, "
          f"{r1 / r2:5.1f}x the embedding phase")
    if len(rows) > 2:
        w3, r3 = rows[2][1][:2]
        print(f"no cache / cache:    {w3 / w2:5.1f}x whole process, "
              f"{r3 / r2:5.1f}x the embedding phase")
    print(f"cache file: {size_mb:.1f} MiB for {n} images; re-run found {cached2} of {n}")
    # What a re-run cannot skip: the interpreter with the clustering stack (imported while
    # the cache is read, so partly hidden), the fit, the copies.
    floor = benchlib.run_child([str(benchlib.REPO / ".venv" / "bin" / "python"), "-c",
                                "import segd.core.cluster"])
    print(f"python -c 'import segd.core.cluster' alone: {floor.wall_s:.2f} s")
    print(f"load average after: {benchlib.load_average()}")
    return 0 if cached2 == n else 1


if __name__ == "__main__":
    sys.exit(main())
