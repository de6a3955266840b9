"""The daemon's refit at library scale: compute_refit over N stored embeddings.

    .venv/bin/python bench/bench_refit.py [--sizes 1000,10000,100000,1000000] [--no-memory-fit]
                                          [--db-dir DIR] [--final both|large|sklearn] [--k N]

Synthetic embeddings (20 Gaussian blobs on the unit sphere in 1280-d, float32, L2-normalised
like the model's output) are written into a real state database (segd.state.store.open_store,
add_image with state 'sorted' and fake absolute paths, transactions of 1000 rows). The
database grows from one size to the next, so each row is inserted once.

At each size, in a fresh subprocess (so its peak RSS is its own):
  * compute_refit(config, FitParams.from_config(config.clustering)): default config, k 2..10
    chosen by the silhouette, reading every embedding through the store's chunked snapshot.
  * for comparison, cluster.fit on the same rows as one in-memory numpy matrix (skipped above
    --memory-fit-max rows, since the matrix alone is n x 5 KiB).
  * the final fit both ways (--final both): as configured (above 100,000 rows the subset-then-
    refine fit of core.kmeans_large) and with sklearn's MiniBatchKMeans forced, as before it;
    after each compute_refit the child times one bare pass over the store's embedding chunks,
    so the table shows how much of a refit is reading (compute_refit makes five such passes:
    the ids, then fit_stream's sample, projection, centroids and assignment).
--k N fixes k (the configured rule may find no structure, k = 1, in these blobs, and then
the final fit has nothing to do). --single-thread runs the children with one BLAS/OpenMP
thread, to show what oversubscribing the cores costs on a loaded machine.
Prints wall time, the child's peak RSS (os.wait4 ru_maxrss) and its RSS after imports, the
chosen k, and the insert rate. Requirements: 100,000 embeddings, k 2..10, under a minute on
2 cores; 1,000,000 under 30 s; memory bounded (not growing with n x 1280 floats).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import numpy as np

DIM = 1280
BLOBS = 20
CHUNK = 1000  # rows per insert transaction, and per generated chunk
SEED = 7

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {bench!r})
from pathlib import Path
import numpy as np
from segd.core.cluster import FitParams, fit
from segd.config import Config
from segd.state.refit import compute_refit
from segd.state.store import open_store
from segd.core import cluster
import bench_refit
if {final!r} == "sklearn":
    cluster.LARGE_FIT_ABOVE = 10**18  # the final fit as before the subset-then-refine one
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
config = Config(state_dir=Path({state!r}))
params = FitParams.from_config(config.clustering)
if {k!r} is not None:
    import dataclasses
    params = dataclasses.replace(params, k={k!r})
t = time.perf_counter()
pass_s = None
if {mode!r} == "store":
    plan = compute_refit(config, params)
    n, k, sil, fit_s = plan.n, plan.fit.k, plan.fit.silhouette, plan.fit.duration_s
    seconds = time.perf_counter() - t
    reader = open_store(config.db_path, readonly=True)
    p = time.perf_counter()
    with reader.snapshot():
        for _ in reader.iter_embedding_chunks(state=None):
            pass
    pass_s = time.perf_counter() - p
    reader.close()
else:
    x = bench_refit.synthetic({n})
    t = time.perf_counter()  # generating the matrix is not part of the fit
    result = fit(x, params)
    n, k, sil, fit_s = len(x), result.k, result.silhouette, result.duration_s
    seconds = time.perf_counter() - t
print(json.dumps(dict(n=n, k=k, silhouette=sil, seconds=seconds, fit_seconds=fit_s,
                      base_rss_mb=base, pass_seconds=pass_s)))
"""


def centres() -> np.ndarray:
    c = np.random.default_rng(SEED).standard_normal((BLOBS, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def synthetic_chunk(index: int, rows: int, c: np.ndarray) -> np.ndarray:
    """Chunk `index` of the synthetic collection: the same rows whoever asks for them."""
    rng = np.random.default_rng((SEED, index))
    labels = rng.integers(0, BLOBS, rows)
    # Noise of norm ~0.9 against centres of norm 1: blobs overlap like real photo classes.
    x = c[labels] + rng.standard_normal((rows, DIM), dtype=np.float32) * np.float32(0.025)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(n: int) -> np.ndarray:
    c = centres()
    return np.concatenate([synthetic_chunk(i, min(CHUNK, n - i * CHUNK), c)
                           for i in range((n + CHUNK - 1) // CHUNK)])


def grow(db: Path, have: int, want: int) -> float:
    """Insert rows have..want-1 into the store; return the insert rate (rows/s)."""
    from segd.state.store import open_store

    c = centres()
    start = time.perf_counter()
    with open_store(db) as s:
        for index in range(have // CHUNK, (want + CHUNK - 1) // CHUNK):
            rows = min(CHUNK, want - index * CHUNK)
            embs = synthetic_chunk(index, rows, c)
            with s.transaction():
                for j, e in enumerate(embs):
                    i = index * CHUNK + j
                    s.add_image(f"{i:064x}", f"img{i}.jpg", f"/library/c{i % BLOBS}/img{i}.jpg",
                                "sorted", embedding=e, distance=0.0)
    return (want - have) / (time.perf_counter() - start)


def child(mode: str, state: Path, n: int, single_thread: bool = False,
          final: str = "large", k: int | None = None) -> dict[str, float]:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), state=str(state),
                        mode=mode, n=n, final=final, k=k)
    env = dict(os.environ)
    if single_thread:  # one BLAS and one OpenMP thread: what threadpool_limits(1) would do
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run = benchlib.run_child([sys.executable, "-c", code], env=env)
    if run.returncode != 0:
        raise SystemExit(f"{mode} child failed ({run.returncode}):\n{run.stderr[-3000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out["wall_s"] = run.wall_s
    out["peak_rss_mb"] = run.peak_rss_mb
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--memory-fit-max", type=int, default=300_000,
                    help="largest n for the in-memory fit comparison")
    ap.add_argument("--single-thread", action="store_true",
                    help="run the children with OMP/OPENBLAS/MKL_NUM_THREADS=1")
    ap.add_argument("--db-dir", type=Path, default=None,
                    help="where the database is built (default: a temporary folder)")
    ap.add_argument("--final", choices=("both", "large", "sklearn"), default="both",
                    help="the final fit: as configured (large), sklearn forced, or both")
    ap.add_argument("--k", type=int, default=None,
                    help="a fixed k instead of the configured rule (the final fit then "
                         "always has k clusters to find)")
    args = ap.parse_args()
    from segd.config import ClusteringConfig

    finals = ["large", "sklearn"] if args.final == "both" else [args.final]
    sizes = sorted(int(s) for s in args.sizes.split(","))

    print(f"machine: {benchlib.machine()}; load average {benchlib.load_average()}")
    if args.k is not None:
        print(f"k fixed at {args.k}")
    if args.single_thread:
        print("children run with OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1")
    print(f"synthetic: {BLOBS} blobs on the unit sphere, {DIM}-d float32; default config "
          f"(k 2..10 by silhouette, pca_dims {ClusteringConfig().pca_dims}, MiniBatchKMeans "
          "above 20,000 rows, subset-then-refine above 100,000 unless --final sklearn)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="segd-refit-", dir=args.db_dir) as tmp:
        state = Path(tmp)
        db = state / "segd.db"
        have = 0
        for n in sizes:
            rate = grow(db, have, n)
            have = n
            size_mb = db.stat().st_size / 2**20
            m = (child("memory", state, n, args.single_thread, k=args.k)
                 if n <= args.memory_fit_max else None)
            for final in finals:
                s = child("store", state, n, args.single_thread, final, args.k)
                rows.append((n, rate, size_mb, final, s, m))
                print(f"  n={n:>9,}: insert {rate:7,.0f} rows/s, db {size_mb:7,.0f} MiB | "
                      f"final fit {final}: compute_refit {s['seconds']:6.1f} s "
                      f"(fit {s['fit_seconds']:5.1f} s, one read pass {s['pass_seconds']:5.1f} s)"
                      f" k={s['k']} peak RSS {s['peak_rss_mb']:5.0f} MiB "
                      f"(after imports {s['base_rss_mb']:.0f})"
                      + ("" if m is None else
                         f" | in-memory fit {m['seconds']:6.1f} s, peak RSS "
                         f"{m['peak_rss_mb']:5.0f} MiB k={m['k']}"), flush=True)

    print("\n| n | insert rows/s | db MiB | final fit | compute_refit s | its fit s "
          "| one read pass s | k | peak RSS MiB | in-memory fit s | in-memory peak RSS MiB "
          "| n x 1280 float32 MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, rate, size_mb, final, s, m in rows:
        mem = ("-", "-") if m is None else (f"{m['seconds']:.1f}", f"{m['peak_rss_mb']:.0f}")
        print(f"| {n:,} | {rate:,.0f} | {size_mb:,.0f} | {final} | {s['seconds']:.1f} | "
              f"{s['fit_seconds']:.1f} | {s['pass_seconds']:.1f} | {s['k']} | "
              f"{s['peak_rss_mb']:.0f} | {mem[0]} | {mem[1]} | {n * DIM * 4 / 2**20:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
