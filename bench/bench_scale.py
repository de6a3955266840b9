"""Beyond one machine: the Ray engine against the local one, and the driver's clustering at scale.

    .venv/bin/python bench/bench_scale.py embed [--data DIR] [--limit N]
    .venv/bin/python bench/bench_scale.py cluster [--sizes 100000,1000000] [--dim 1280]
    .venv/bin/python bench/bench_scale.py final [--sizes 100000,1000000]

embed: `segd sort` on the distinct five of clothing10 (or --data), gpu off, --no-cache, as a
  child process: the local engine, then --engine ray with one worker (one actor of 2 CPUs)
  and with two (two actors of 1 CPU). Ray starts a local instance in each run (its start-up,
  ~13 s, is outside the reported embedding rate; the actors' model loading is inside, as
  the local engine's is). Peak RSS is the driver's alone (Ray's workers are other processes).
cluster: the driver's clustering step as --engine ray runs it: core.cluster.fit_stream over
  shard files (the real format, 2000 rows each) of n synthetic embeddings (10 Gaussian blobs
  on the unit sphere, L2-normalised, --dim), k chosen 2..10 by the configured rule, default
  config; "sklearn": every row projected and clustered (MiniBatchKMeans, as at and below
  100,000 rows); "numpy" and "faiss": the fit decided on a 20,000-row sample (its KMeans
  core.kmeans_large's, refined in numpy or FAISS) and applied in one pass, as above 100,000
  rows. Each in a fresh child: wall time, peak RSS (os.wait4), ARI against the blobs.
final: the final fit alone on (n, 32) projected rows (10 blobs, --noise): sklearn KMeans and
  MiniBatchKMeans (n_init 4), FAISS KMeans from random starts, and subset-then-refine
  (numpy, FAISS). One BLAS/OpenMP thread, OMP_WAIT_POLICY=PASSIVE, as in a fit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import numpy as np

BLOBS = 10
SEED = 11
SHARD_ROWS = 2000


# ---- embed


def embed_runs(data: Path | None, limit: int) -> None:
    files = benchlib.list_images(data, limit)
    print(f"{len(files)} photos; machine: {benchlib.machine()}; load {benchlib.load_average()}")
    runs = [("local", []), ("ray, 1 worker (1 actor x 2 CPU)", ["--actor-cpus", "2"]),
            ("ray, 2 workers (2 actors x 1 CPU)", ["--actor-cpus", "1"])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="segd-scale-") as tmp:
        root = Path(tmp)
        src = benchlib.stage_flat(files, root / "src")
        benchlib.warm_page_cache(sorted(src.iterdir()))
        config = root / "config.yaml"
        config.write_text("model:\n  gpu: \"off\"\n")
        for i, (name, extra) in enumerate(runs):
            dest = root / f"dest{i}"
            engine = ["--engine", "ray", *extra] if extra else []
            run = benchlib.run_child([str(benchlib.SEGD), "sort", str(src), str(dest),
                                      "--config", str(config), "--no-progress", "--no-cache",
                                      *engine],
                                     env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
            if run.returncode != 0:
                raise SystemExit(f"{name} failed:\n{run.stderr[-3000:]}")
            with (dest / "manifest.csv").open(newline="") as fh:
                placed = sum(1 for r in list(csv.reader(fh))[1:] if r[1])
            rate = next(float(line.split("s, ")[1].split(" images/s")[0])
                        for line in run.stdout.splitlines() if "images/s embedded" in line)
            rows.append((name, placed, rate, run.wall_s, run.peak_rss_mb))
            print(f"  {name}: {placed} placed, {rate:.1f} images/s embedded, "
                  f"{run.wall_s:.1f} s wall, driver peak RSS {run.peak_rss_mb:.0f} MiB",
                  flush=True)
    print("\n| engine | placed | embedding images/s | wall s | driver peak RSS MiB |")
    print("|---|---|---|---|---|")
    for name, placed, rate, wall, rss in rows:
        print(f"| {name} | {placed} | {rate:.1f} | {wall:.1f} | {rss:.0f} |")


# ---- cluster


CLUSTER_CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
from pathlib import Path
import numpy as np
from sklearn.metrics import adjusted_rand_score
from segd.batch import shards
from segd.config import ClusteringConfig
from segd.core import cluster, kmeans_large
from segd.core.cluster import FitParams, fit_stream
variant = {variant!r}
# Whatever n is: the final fit this variant names.
cluster.LARGE_FIT_ABOVE = 10**18 if variant == "sklearn" else 0
if variant == "faiss":
    assert kmeans_large.faiss_available(), "faiss is not installed"
    kmeans_large.FAISS_FROM_K = 0
dest = Path({dest!r})
n = {n}
cut = [shards.Shard(i, f"{{i:064x}}", 0, 0, min({rows}, n - i * {rows}))
       for i in range((n + {rows} - 1) // {rows})]
truth = np.load(dest / "truth.npy")
t = time.perf_counter()
result = fit_stream(shards.embedding_chunks(dest, cut), n,
                    FitParams.from_config(ClusteringConfig()))
seconds = time.perf_counter() - t
print(json.dumps(dict(k=result.k, seconds=seconds,
                      ari=adjusted_rand_score(truth, result.labels))))
"""


def write_synthetic_shards(dest: Path, n: int, dim: int) -> None:
    from segd.batch import shards

    rng = np.random.default_rng(SEED)
    centres = rng.standard_normal((BLOBS, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.empty(n, dtype=np.int64)
    for i, lo in enumerate(range(0, n, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n - lo)
        labels = rng.integers(0, BLOBS, rows)
        # Noise of norm ~0.9 against unit centres: overlapping, like photo classes.
        x = centres[labels] + rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(
            0.9 / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        truth[lo:lo + rows] = labels
        shards.write_shard_file(shards.shard_path(dest, f"{i:064x}"), {"count": rows}, b"",
                                np.ones(rows, dtype=bool), x, [])
    np.save(dest / "truth.npy", truth)



def _run_variant(code: str, variant: str) -> tuple[dict[str, Any], float]:
    """Run one child's code (FAISS's OpenMP threads told not to spin): its last line of
    JSON output, and its peak RSS in MiB."""
    run = benchlib.run_child([sys.executable, "-c", code],
                             env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    if run.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1]), run.peak_rss_mb


def cluster_runs(sizes: list[int], dim: int, variants: list[str]) -> None:
    print(f"machine: {benchlib.machine()}; load {benchlib.load_average()}")
    print(f"{BLOBS} blobs in {dim}-d, shard files of {SHARD_ROWS} rows; default config")
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="segd-scale-") as tmp:
            dest = Path(tmp)
            write_synthetic_shards(dest, n, dim)
            for variant in variants:
                code = CLUSTER_CHILD.format(bench=str(Path(__file__).resolve().parent),
                                            variant=variant, dest=str(dest), n=n,
                                            rows=SHARD_ROWS)
                out, rss = _run_variant(code, variant)
                rows.append((n, variant, out, rss))
                print(f"  n={n:>9,} {variant:>7}: fit_stream {out['seconds']:6.1f} s, "
                      f"k={out['k']}, "
                      f"ARI {out['ari']:.4f}, peak RSS {rss:5.0f} MiB", flush=True)
    print("\n| n | final fit | fit_stream s | k | ARI | peak RSS MiB | n x d float32 MiB |")
    print("|---|---|---|---|---|---|---|")
    for n, variant, out, rss in rows:
        print(f"| {n:,} | {variant} | {out['seconds']:.1f} | {out['k']} | {out['ari']:.4f} | "
              f"{rss:.0f} | {n * dim * 4 / 2**20:,.0f} |")


# ---- final


FINAL_CHILD = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
from sklearn.metrics import adjusted_rand_score
from sklearn.cluster import KMeans, MiniBatchKMeans
from segd.core import kmeans_large
variant, n = {variant!r}, {n}
rng = np.random.default_rng({seed})
centres = rng.standard_normal(({blobs}, 32)).astype(np.float32)
centres /= np.linalg.norm(centres, axis=1, keepdims=True)
truth = rng.integers(0, {blobs}, n)
scale = np.float32({noise} / np.sqrt(32))
z = centres[truth] + rng.standard_normal((n, 32), dtype=np.float32) * scale
z /= np.linalg.norm(z, axis=1, keepdims=True)
with threadpool_limits(1):
    t = time.perf_counter()
    if variant == "sklearn KMeans":
        labels = KMeans({blobs}, n_init=4, random_state=0).fit_predict(z)
    elif variant == "sklearn MiniBatch":
        labels = MiniBatchKMeans({blobs}, n_init=4, random_state=0, batch_size=4096).fit_predict(z)
    elif variant == "faiss random":
        faiss = kmeans_large.import_faiss()
        km = faiss.Kmeans(32, {blobs}, niter=20, seed=0, max_points_per_centroid=n // {blobs} + 1)
        km.train(z)
        labels = km.index.search(z, 1)[1][:, 0]
    else:
        labels = kmeans_large.fit_large(z, {blobs}, backend=variant.split()[-1]).labels_
    seconds = time.perf_counter() - t
print(json.dumps(dict(seconds=seconds, ari=adjusted_rand_score(truth, labels))))
"""
FINAL_VARIANTS = ["sklearn KMeans", "sklearn MiniBatch", "faiss random", "subset+refine numpy",
                  "subset+refine faiss"]


def final_runs(sizes: list[int], noise: float) -> None:
    print(f"machine: {benchlib.machine()}; load {benchlib.load_average()}")
    print(f"the final fit alone: (n, 32) rows, {BLOBS} blobs (noise norm {noise} against unit "
          "centres), one thread")
    rows = []
    for n in sizes:
        for variant in FINAL_VARIANTS:
            code = FINAL_CHILD.format(variant=variant, n=n, seed=SEED, blobs=BLOBS, noise=noise)
            out, rss = _run_variant(code, variant)
            rows.append((n, variant, out, rss))
            print(f"  n={n:>9,} {variant:>20}: {out['seconds']:6.2f} s, ARI {out['ari']:.4f}, "
                  f"peak RSS {rss:5.0f} MiB", flush=True)
    print("\n| n | final fit | s | ARI | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for n, variant, out, rss in rows:
        print(f"| {n:,} | {variant} | {out['seconds']:.2f} | {out['ari']:.4f} | {rss:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("embed")
    e.add_argument("--data", type=Path, default=None)
    e.add_argument("--limit", type=int, default=0)
    c = sub.add_parser("cluster")
    c.add_argument("--sizes", default="100000,1000000")
    c.add_argument("--dim", type=int, default=1280)
    c.add_argument("--variants", default="sklearn,numpy,faiss")
    f = sub.add_parser("final")
    f.add_argument("--sizes", default="100000,1000000")
    f.add_argument("--noise", type=float, default=1.0,
                   help="noise norm against unit centres (1.0: blobs overlap; 0.6: apart)")
    args = ap.parse_args()
    if args.what == "embed":
        embed_runs(args.data, args.limit)
    elif args.what == "cluster":
        cluster_runs([int(s) for s in args.sizes.split(",")], args.dim,
                     args.variants.split(","))
    else:
        final_runs([int(s) for s in args.sizes.split(",")], args.noise)
    return 0


if __name__ == "__main__":
    sys.exit(main())
