"""The embedding cache: `segd sort` run again with another k, against its first run.

    .venv/bin/python bench/bench_cache.py [--data DIR] [--limit N] [--k K] [--repeats R]
                                          [--no-baseline]

Images: the "distinct five" of clothing10 (949 photos), or every image under DIR, staged
into one folder and read once so both runs see a warm page cache. The cache is a fresh one
under a temporary $XDG_CACHE_HOME, so the first run starts from nothing.

    (1) `segd sort SRC DEST1` (k auto): every image decoded and embedded, the cache filled
    (2) `segd sort SRC DEST2 --k K`: the user's second try; every vector from the cache
        (R times, each into a fresh DEST; the median by wall time is shown)
    (3) the same with --no-cache, what (2) cost before the cache (skip: --no-baseline)

The runs find their bytecode compiled, as an installed segd does: PYTHONDONTWRITEBYTECODE is
dropped and PYTHONPYCACHEPREFIX points into the temporary folder, filled by one untimed
import of everything a sort loads.

The staged files are left to settle (their ctime older than the cache's SETTLED_NS) before
(1), as a folder sorted again later would be: a hash read sooner is not filed under the stat.

Each run is a child process: wall time from start to exit, and from segd's own debug log
the seconds until every embedding was ready (the phase the cache replaces), then until the
clustering stack had loaded, the fit was done and the files were placed. Printed: those
times for each run, the ratios (1)/(2) and (3)/(2), and, for scale, the time an interpreter
takes to start, import the clustering stack and exit. The goal is (1)/(2) >= 20.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

READY = re.compile(r"embeddings ready ([0-9.]+) s after the sort started: (\d+) embedded, "
                   r"(\d+) from the cache.*?(\d+) read and hashed")
PHASES = {"loaded": re.compile(r"clustering stack loaded ([0-9.]+) s"),
          "fit": re.compile(r"fit done ([0-9.]+) s"),
          "placed": re.compile(r"placed and synced ([0-9.]+) s")}
SETTLE_S = 2.5  # beyond segd.state.cache.SETTLED_NS
PYTHON = str(benchlib.REPO / ".venv" / "bin" / "python")
WARM = ("import onnxruntime, segd.cli, segd.commands.sort, segd.batch.sort, segd.core.cluster, "
        "segd.views.report, segd.state.store")


@dataclass
class Run:
    wall: float
    ready: float  # s after the sort started, from segd's debug log
    embedded: int
    cached: int
    hashed: int  # files read and hashed to find their sha256 (the rest: by their stat)
    phases: dict[str, float]


def sort(src: Path, dest: Path, config: Path, env: dict[str, str], n: int,
         *extra: str) -> Run:
    """One `segd sort`, timed."""
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
    phases = {name: float(p.group(1)) for name, rx in PHASES.items()
              if (p := rx.search(run.stderr))}
    return Run(run.wall_s, float(m.group(1)), int(m.group(2)), int(m.group(3)),
               int(m.group(4)), phases)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="folder of images (default: the distinct five of clothing10)")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--k", type=int, default=4, help="the k of the second run")
    ap.add_argument("--gpu", default="off", choices=("off", "preferred"),
                    help="model.gpu for the runs (default off: no GPU build here)")
    ap.add_argument("--repeats", type=int, default=3, help="re-runs (2); the median is shown")
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
        newest = max(p.stat().st_ctime for p in src.iterdir())
        time.sleep(max(0.0, newest + SETTLE_S - time.time()))
        config = work / "config.yaml"
        config.write_text(f'model:\n  gpu: "{args.gpu}"\nstate_dir: {work / "state"}\n')
        env = dict(os.environ, XDG_CACHE_HOME=str(work / "xdg"),
                   PYTHONPYCACHEPREFIX=str(work / "pycache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if benchlib.run_child([PYTHON, "-c", WARM], env=env).returncode != 0:
            raise SystemExit("cannot import segd")

        rows = [("(1) first run, k auto", sort(src, work / "d1", config, env, n))]
        again = sorted((sort(src, work / f"d2-{r}", config, env, n, "--k", str(args.k))
                        for r in range(args.repeats)), key=lambda run: run.wall)
        rows.append((f"(2) again, --k {args.k}", again[len(again) // 2]))
        walls = ", ".join(f"{run.wall:.2f}" for run in again)
        if not args.no_baseline:
            rows.append((f"(3) again, --k {args.k} --no-cache",
                         sort(src, work / "d3", config, env, n, "--k", str(args.k),
                              "--no-cache")))
        cache = work / "xdg" / "segd" / "embeddings.sqlite"
        size_mb = cache.stat().st_size / 2**20
        # What a re-run cannot skip: the interpreter with the clustering stack (imported
        # while the cache is read, so partly hidden), the fit, the copies.
        floor = benchlib.run_child([PYTHON, "-c", "import segd.core.cluster"], env=env)
        as_sort = benchlib.run_child([PYTHON, "-c", "import gc, sys; sys.modules['pandas'] = None; "
                                      "import segd.core.cluster; gc.freeze()"], env=env)

    print(f"\n{'run':<32} {'wall s':>7} {'embeddings':>10} {'loaded':>7} {'fit':>6} "
          f"{'placed':>7} {'embedded':>9} {'cached':>7} {'hashed':>7}")
    for name, r in rows:
        ph = [f"{r.phases[k]:.2f}" if k in r.phases else "-" for k in PHASES]
        print(f"{name:<32} {r.wall:7.2f} {r.ready:10.3f} {ph[0]:>7} {ph[1]:>6} {ph[2]:>7} "
              f"{r.embedded:9d} {r.cached:7d} {r.hashed:7d}")
    print("(loaded, fit, placed: s after the sort started; hashed: files read to find their "
          f"sha256, the rest known by their stat; re-runs (2): {walls} s)")
    first, again = rows[0][1], rows[1][1]
    cached2 = again.cached
    print(f"\nfirst run / re-run:  {first.wall / again.wall:5.1f}x whole process, "
          f"{first.ready / again.ready:5.1f}x the embedding phase")
    if len(rows) > 2:
        base = rows[2][1]
        print(f"no cache / cache:    {base.wall / again.wall:5.1f}x whole process, "
              f"{base.ready / again.ready:5.1f}x the embedding phase")
    print(f"cache file: {size_mb:.1f} MiB for {n} images; re-run found {cached2} of {n}")
    print(f"python -c 'import segd.core.cluster' alone: {floor.wall_s:.2f} s "
          f"({as_sort.wall_s:.2f} s as a sort loads it: pandas held off, then gc.freeze())")
    print(f"load average after: {benchlib.load_average()}")
    return 0 if cached2 == n else 1


if __name__ == "__main__":
    sys.exit(main())
