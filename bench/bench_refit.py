"""The daemon's refit at library scale: compute_refit over N stored embeddings.

    .venv/bin/python bench/bench_refit.py [--sizes 1000,10000,100000,1000000]
                                          [--path sampled|all-rows|both] [--k N]
                                          [--cache DIR | --no-cache] [--memory-fit-max N]

Synthetic embeddings (20 Gaussian blobs on the unit sphere in 1280-d, float32, L2-normalised
like the model's output) are written into a real state database (segd.state.store.open_store,
add_image with state 'sorted' and fake absolute paths, transactions of 1000 rows). One
database per size, kept under --cache (default .cache/bench/refit/; building 10^6 rows takes
about 3 minutes and 5.4 GiB) and reused by later runs; --no-cache builds in a temporary folder.

At each size, in a fresh subprocess (so its peak RSS is its own):
  * compute_refit(config, FitParams.from_config(config.clustering)): default config, k chosen
    by the configured rule (k 2..10). Above core.cluster.LARGE_FIT_ABOVE (100,000) rows the
    fit is decided on a 20,000-row sample read by id and applied in one pass over the store
    (--path sampled, the default); --path all-rows forces the path below the threshold at
    every size (every row projected and clustered, the store read four more times), which is
    how every refit ran before the sampled path.
  * the seconds of each phase of a sampled fit: ids (the ids alone, no vector), sample (its
    rows read by id), projection, k (the selection), kmeans, pass (the one read of every row
    and its assignment), and after compute_refit, one bare pass over the store's embedding
    chunks, so the table shows how much of a refit is reading.
  * for comparison, cluster.fit on the same rows as one in-memory numpy matrix (up to
    --memory-fit-max rows, since the matrix alone is n x 5 KiB).
Each database is read once into the page cache before its children run (a daemon's store
is usually there; the first read from a cold disk is the disk's speed, not segd's).
Prints wall time, the child's peak RSS (os.wait4 ru_maxrss) and its RSS after imports, the
chosen k, the ARI of the labels against the blobs, and the ratio of compute_refit's time to
the goal. Requirements: 100,000 embeddings, k 2..10, under a minute on 2 cores; 1,000,000
under 30 s; memory bounded (not growing with n x 1280 floats).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import numpy as np

DIM = 1280
BLOBS = 20
CHUNK = 1000  # rows per insert transaction, and per generated chunk
SEED = 7
GOAL_S = 30.0  # compute_refit at 10^6 rows
GOAL_N = 1_000_000
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "bench" / "refit"

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {bench!r})
from pathlib import Path
import numpy as np
from sklearn.metrics import adjusted_rand_score
from segd.core.cluster import FitParams, fit
from segd.config import Config
from segd.state.refit import compute_refit
from segd.state.store import open_store
from segd.core import cluster
import bench_refit
if {path!r} == "all-rows":
    cluster.LARGE_FIT_ABOVE = 10**18  # every row projected and clustered, as before
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
config = Config(state_dir=Path({state!r}))
params = FitParams.from_config(config.clustering)
if {k!r} is not None:
    import dataclasses
    params = dataclasses.replace(params, k={k!r})
t = time.perf_counter()
pass_s = None
phases = {{}}
if {mode!r} == "store":
    plan = compute_refit(config, params)
    seconds = time.perf_counter() - t
    n, k, sil, fit_s = plan.n, plan.fit.k, plan.fit.silhouette, plan.fit.duration_s
    phases = plan.fit.phases
    labels, truth = plan.fit.labels, bench_refit.truth(plan.n)[plan.ids - 1]
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
    seconds = time.perf_counter() - t
    n, k, sil, fit_s = len(x), result.k, result.silhouette, result.duration_s
    labels, truth = result.labels, bench_refit.truth(len(x))
print(json.dumps(dict(n=n, k=k, silhouette=sil, seconds=seconds, fit_seconds=fit_s,
                      base_rss_mb=base, pass_seconds=pass_s, phases=phases,
                      ari=adjusted_rand_score(truth, labels))))
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


def truth(n: int) -> np.ndarray:
    """The blob of each of the first n rows (row i is image id i + 1)."""
    return np.concatenate([np.random.default_rng((SEED, i)).integers(
        0, BLOBS, min(CHUNK, n - i * CHUNK)) for i in range((n + CHUNK - 1) // CHUNK)])


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
    return (want - have) / max(time.perf_counter() - start, 1e-9)


@contextlib.contextmanager
def store_of(n: int, cache: Path | None) -> Iterator[tuple[Path, float | None]]:
    """A state folder whose database holds the first n synthetic rows, and the insert rate
    (None: found in the cache). Cached folders are named by what their rows depend on."""
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="segd-refit-") as tmp:
            yield Path(tmp), grow(Path(tmp) / "segd.db", 0, n)
        return
    from segd.state.store import open_store

    state = cache / f"n{n}-blobs{BLOBS}-d{DIM}-seed{SEED}"
    done = state / "complete"
    rate = None
    if not done.exists():
        state.mkdir(parents=True, exist_ok=True)
        (state / "segd.db").unlink(missing_ok=True)
        rate = grow(state / "segd.db", 0, n)
        done.touch()
    with open_store(state / "segd.db"):  # brings an older cached schema up to date
        pass
    yield state, rate


def child(mode: str, state: Path, n: int, path: str = "sampled",
          k: int | None = None) -> dict[str, object]:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), state=str(state),
                        mode=mode, n=n, path=path, k=k)
    run = benchlib.run_child([sys.executable, "-c", code], env=dict(os.environ))
    if run.returncode != 0:
        raise SystemExit(f"{mode} child failed ({run.returncode}):\n{run.stderr[-3000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    out["wall_s"] = run.wall_s
    out["peak_rss_mb"] = run.peak_rss_mb
    return out


PHASES = ("ids", "sample", "projection", "k", "kmeans", "pass")


def warm(state: Path) -> float:
    """Read the database files once (16 MiB at a time) so that every child finds them in
    the page cache, as a daemon's refit finds the store it writes to; returns seconds."""
    start = time.perf_counter()
    for f in sorted(state.glob("segd.db*")):
        with f.open("rb") as fh:
            while fh.read(1 << 24):
                pass
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--memory-fit-max", type=int, default=100_000,
                    help="largest n for the in-memory fit comparison")
    ap.add_argument("--path", choices=("sampled", "all-rows", "both"), default="sampled",
                    help="above 100,000 rows: the sampled fit, every row clustered, or both")
    ap.add_argument("--k", type=int, default=None,
                    help="a fixed k instead of the configured rule")
    ap.add_argument("--cache", type=Path, default=CACHE,
                    help="where the databases are kept between runs")
    ap.add_argument("--no-cache", action="store_true", help="build in a temporary folder")
    args = ap.parse_args()
    from segd.config import ClusteringConfig

    paths = ["sampled", "all-rows"] if args.path == "both" else [args.path]
    sizes = sorted(int(s) for s in args.sizes.split(","))
    cache = None if args.no_cache else args.cache

    print(f"machine: {benchlib.machine()}; load average {benchlib.load_average()}")
    if args.k is not None:
        print(f"k fixed at {args.k}")
    c = ClusteringConfig()
    print(f"synthetic: {BLOBS} blobs on the unit sphere, {DIM}-d float32; default config "
          f"(k {c.k_min}..{c.k_max} by {c.k_rule}, pca_dims {c.pca_dims}; above 100,000 rows "
          "a 20,000-row sample decides, one pass applies)")
    rows = []
    for n in sizes:
        with store_of(n, cache) as (state, rate):
            size_mb = (state / "segd.db").stat().st_size / 2**20
            warm_s = warm(state)
            m = child("memory", state, n, k=args.k) if n <= args.memory_fit_max else None
            for path in paths:
                s = child("store", state, n, path, args.k)
                rows.append((n, rate, size_mb, path, s, m))
                phases = s["phases"]
                assert isinstance(phases, dict)
                split = ", ".join(f"{p} {phases[p]:.1f}" for p in PHASES if p in phases)
                built = ("cached" if rate is None else f"built at {rate:,.0f} rows/s") + (
                    f", read into the page cache in {warm_s:.1f} s")
                print(f"  n={n:>9,} ({built}, db {size_mb:,.0f} MiB) {path}: compute_refit "
                      f"{s['seconds']:.1f} s [{split or 'no phases below the threshold'}] "
                      f"k={s['k']} ARI {s['ari']:.3f} peak RSS {s['peak_rss_mb']:.0f} MiB "
                      f"(after imports {s['base_rss_mb']:.0f}); one bare read pass "
                      f"{s['pass_seconds']:.1f} s"
                      + ("" if m is None else
                         f" | in-memory fit {m['seconds']:.1f} s k={m['k']} "
                         f"ARI {m['ari']:.3f}"), flush=True)

    print("\n| n | path | compute_refit s | " + " | ".join(f"{p} s" for p in PHASES)
          + " | one read pass s | k | ARI | peak RSS MiB | after imports MiB "
          "| n x 1280 float32 MiB |")
    print("|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|---|---|")
    for n, _, _, path, s, _ in rows:
        phases = s["phases"]
        assert isinstance(phases, dict)
        split = " | ".join(f"{phases[p]:.1f}" if p in phases else "-" for p in PHASES)
        print(f"| {n:,} | {path} | {s['seconds']:.1f} | {split} | {s['pass_seconds']:.1f} | "
              f"{s['k']} | {s['ari']:.3f} | {s['peak_rss_mb']:.0f} | {s['base_rss_mb']:.0f} | "
              f"{n * DIM * 4 / 2**20:,.0f} |")
    for n, _, _, path, s, _ in rows:
        if n == GOAL_N:
            print(f"\n{n:,} rows, {path}: {s['seconds']:.1f} s, "
                  f"{float(s['seconds']) / GOAL_S:.2f} x the {GOAL_S:.0f} s goal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
