"""Choosing k across collections: which rule generalises (issue 9).

    python bench/bench_k.py            # every collection and method (~10 min on 2 cores)
    python bench/bench_k.py --quick    # 8 collections, the main methods (~1-2 min)
    python bench/bench_k.py --cost     # also time the recommended rule on 20,000 rows

Embeddings come from bench/kstudy_embed.py (segd's own decode + embed path, cached as npz
under .cache/k-study/; run first, or it is run for you). Collections: clothing10 five and ten,
scenes6 (benchmark only, read in place), labelled sub-collections of those (random 3- and
4-class subsets, 2-class, unbalanced 4:1, small 32-150 photos), and synthetic mixtures on
the sphere in the 1280-d space with known k (k = 1, 3, 5, 8) whose within-cluster noise is
the real within-class residual covariance of clothing10 and whose overlap is set so that
KMeans at the true k scores an ARI like the real sets do.

For every method and collection: chosen k, ARI at the chosen k (KMeans in the method's
space), ARI at the true k (same space), time. Summaries rank methods by their worst and
mean results, and a leave-one-collection-out pass picks the method on all collections but
one and reports it on the held-out one. Labels are used only to score.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kselect_study as ks
from kchoice import choose_k

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "k-study"
KS = list(range(2, 11))  # segd's default k range
FIVE = ("dress", "hat", "pants", "shoes", "t-shirt")
RESULTS_VERSION = 3


# ------------------------------------------------------------------------------------------
# Collections
# ------------------------------------------------------------------------------------------


@dataclass
class Collection:
    name: str
    x: np.ndarray  # (n, 1280) float32, L2-normalised
    y: np.ndarray  # (n,) int labels (scoring only)
    kind: str  # real | synthetic

    @property
    def true_k(self) -> int:
        return len(np.unique(self.y))


def load(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    f = CACHE / f"{name}.npz"
    if not f.exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "kstudy_embed.py")],
                       check=True)
    d = np.load(f)
    return d["embeddings"], d["labels"], [str(c) for c in d["classes"]]


def pick(x: np.ndarray, y: np.ndarray, classes: list[str], take: dict[str, int],
         rng: np.random.Generator, name: str) -> Collection:
    """The given number of photos (0 = all) of each named class, drawn at random."""
    rows: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for li, (c, n) in enumerate(take.items()):
        idx = np.flatnonzero(y == classes.index(c))
        if n:
            idx = np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))
        rows.append(idx)
        labels.append(np.full(len(idx), li))
    r = np.concatenate(rows)
    return Collection(name, x[r], np.concatenate(labels), "real")


def real_collections() -> list[Collection]:
    xc, yc, cc = load("clothing10")
    xs, ys, cs = load("scenes6")
    rng = np.random.default_rng(9)
    out = [
        pick(xc, yc, cc, dict.fromkeys(FIVE, 0), rng, "clothing five"),
        Collection("clothing ten", xc, yc, "real"),
        Collection("scenes6", xs, ys, "real"),
    ]
    for _ in range(3):
        names = sorted(rng.choice(cc, 3, replace=False).tolist())
        out.append(pick(xc, yc, cc, dict.fromkeys(names, 0), rng, "clothing " + "/".join(names)))
    for _ in range(2):
        names = sorted(rng.choice(cc, 4, replace=False).tolist())
        out.append(pick(xc, yc, cc, dict.fromkeys(names, 0), rng, "clothing " + "/".join(names)))
    for _ in range(2):
        names = sorted(rng.choice(cs, 3, replace=False).tolist())
        out.append(pick(xs, ys, cs, dict.fromkeys(names, 0), rng, "scenes " + "/".join(names)))
    for _ in range(2):
        names = sorted(rng.choice(cs, 4, replace=False).tolist())
        out.append(pick(xs, ys, cs, dict.fromkeys(names, 0), rng, "scenes " + "/".join(names)))
    out += [
        pick(xc, yc, cc, {"hat": 0, "shoes": 0}, rng, "clothing hat/shoes (2)"),
        pick(xs, ys, cs, {"forest": 0, "street": 0}, rng, "scenes forest/street (2)"),
        pick(xc, yc, cc, {"pants": 200, "shoes": 200, "hat": 50}, rng,
             "unbalanced clothing pants 200/shoes 200/hat 50"),
        pick(xc, yc, cc, {"dress": 200, "t-shirt": 50, "shoes": 100, "pants": 50}, rng,
             "unbalanced clothing dress 200/t-shirt 50/shoes 100/pants 50"),
        pick(xs, ys, cs, {"forest": 100, "sea": 100, "street": 25}, rng,
             "unbalanced scenes forest 100/sea 100/street 25"),
        pick(xc, yc, cc, dict.fromkeys(("hat", "pants", "shoes", "t-shirt"), 8), rng,
             "small 32: clothing 4 x 8"),
        pick(xs, ys, cs, dict.fromkeys(("forest", "sea", "street"), 20), rng,
             "small 60: scenes 3 x 20"),
        pick(xc, yc, cc, dict.fromkeys(FIVE, 20), rng, "small 100: clothing five x 20"),
        pick(xs, ys, cs, dict.fromkeys(cs, 25), rng, "small 150: scenes6 x 25"),
    ]
    return out


def synthetic_collections() -> list[Collection]:
    """Mixtures on the sphere in the embedding space. Noise = Gaussian with the pooled
    within-class covariance of clothing10 (real residuals); centres = global mean plus a
    Gaussian offset with `alpha` times clothing10's between-class covariance (the spread of
    its ten class means, so the centres lie in the same few directions real classes differ
    in, and some pairs of centres come out close, as near-synonym classes do); then
    L2-normalised. alpha = 2.5 gives silhouettes of 0.1-0.4 and a KMeans ARI at the true k
    of ~0.85-1.0: overlapping, realistic clusters, not trivially separable ones (with
    centres drawn from the within-class covariance instead, the silhouette is far below the
    real sets' and clusters are either fully mixed or trivially separable)."""
    xc, yc, _ = load("clothing10")
    x64 = xc.astype(np.float64)
    means = np.stack([x64[yc == c].mean(axis=0) for c in np.unique(yc)])
    resid = x64 - means[yc]
    gm = x64.mean(axis=0)
    total = x64 - gm
    between = means - means.mean(axis=0)
    rng = np.random.default_rng(2024)

    def gauss(base: np.ndarray, n: int) -> np.ndarray:
        return (rng.standard_normal((n, len(base))) @ base) / np.sqrt(len(base))

    def mixture(sizes: list[int], alpha: float, name: str) -> Collection:
        centres = gm + np.sqrt(alpha) * gauss(between, len(sizes))
        parts = [centres[i] + gauss(resid, n) for i, n in enumerate(sizes)]
        y = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
        return Collection(name, ks.normalize_rows(np.concatenate(parts)), y, "synthetic")

    out = [
        Collection("synthetic k=1 gaussian (total cov.), 600",
                   ks.normalize_rows(gm + gauss(total, 600)), np.zeros(600, int), "synthetic"),
    ]
    # Heavy tails: a Gaussian scale mixture (multivariate t, 4 degrees of freedom).
    w = np.sqrt(4 / rng.chisquare(4, size=(600, 1)))
    out.append(Collection("synthetic k=1 student-t (total cov.), 600",
                          ks.normalize_rows(gm + w * gauss(total, 600)), np.zeros(600, int),
                          "synthetic"))
    # Real photos with their class structure removed: residuals around the global mean.
    r = rng.choice(len(resid), 600, replace=False)
    out.append(Collection("synthetic k=1 class-centred clothing residuals, 600",
                          ks.normalize_rows(gm + resid[r]), np.zeros(600, int), "synthetic"))
    out += [
        mixture([200] * 3, 2.5, "synthetic k=3, 3 x 200 (a)"),
        mixture([200] * 3, 2.5, "synthetic k=3, 3 x 200 (b)"),
        mixture([120] * 5, 2.5, "synthetic k=5, 5 x 120 (a)"),
        mixture([120] * 5, 2.5, "synthetic k=5, 5 x 120 (b)"),
        mixture([100] * 8, 2.5, "synthetic k=8, 8 x 100 (a)"),
        mixture([100] * 8, 2.5, "synthetic k=8, 8 x 100 (b)"),
        mixture([300, 150, 75, 75, 300], 2.5, "synthetic k=5 unbalanced 300..75"),
        mixture([20] * 4, 2.5, "synthetic k=4 small, 4 x 20"),
    ]
    return out


# ------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    name: str
    space: str  # raw | pcaP
    fn: Callable[..., ks.Choice]
    family: str


def methods(quick: bool = False) -> list[MethodSpec]:
    P = functools.partial
    out: list[MethodSpec] = []
    spaces = ["raw", "pca16", "pca32", "pca64", "pca128"]
    for sp in spaces:
        out.append(MethodSpec(f"silhouette {sp}", sp, ks.silhouette_k, "silhouette"))
    out.append(MethodSpec("silhouette pca32 sample 1000", "pca32",
                          P(ks.silhouette_k, sample=1000), "silhouette"))
    for sp in ["raw", "pca32"]:
        out.append(MethodSpec(f"silhouette {sp} mean of 3 seeds", sp, ks.silhouette_seeds,
                              "silhouette"))
    for sp in ["raw", "pca16", "pca32", "pca64"]:
        for tol in (0.005, 0.01, 0.02):
            out.append(MethodSpec(f"margin {sp} tol {tol}", sp,
                                  P(ks.silhouette_margin, tol=tol), "margin"))
    for sp in spaces:
        out.append(MethodSpec(f"null-excess {sp}", sp, ks.silhouette_excess, "null-excess"))
        if sp in ("raw", "pca32", "pca64"):
            out.append(MethodSpec(f"null-excess {sp} tol 0.01", sp,
                                  P(ks.silhouette_excess, tol=0.01), "null-excess"))
    out.append(MethodSpec("silhouette pca32 + null test", "pca32",
                          P(ks.silhouette_with_null_test, base=ks.silhouette_k), "silhouette"))
    out.append(MethodSpec("silhouette raw + null test", "raw",
                          P(ks.silhouette_with_null_test, base=ks.silhouette_k), "silhouette"))
    out.append(MethodSpec(RECOMMENDED, "pca32", _reference, "recommended"))
    if quick:
        return [m for m in out if m.name in QUICK_METHODS]
    out += [
        MethodSpec("calinski-harabasz pca32", "pca32", ks.calinski_harabasz, "index"),
        MethodSpec("davies-bouldin pca32", "pca32", ks.davies_bouldin, "index"),
        MethodSpec("gap (gaussian ref) pca32", "pca32", ks.gap_statistic, "gap"),
        MethodSpec("gap (uniform box ref) pca32", "pca32",
                   P(ks.gap_statistic, reference="box"), "gap"),
        MethodSpec("prediction strength pca32 min 0.8", "pca32", ks.prediction_strength, "ps"),
        MethodSpec("prediction strength pca32 mean 0.8", "pca32",
                   P(ks.prediction_strength, how="mean"), "ps"),
        MethodSpec("prediction strength pca32 mean 0.7", "pca32",
                   P(ks.prediction_strength, how="mean", threshold=0.7), "ps"),
        MethodSpec("stability pca32 most stable", "pca32", ks.stability, "stability"),
        MethodSpec("stability pca32 largest >= 0.8", "pca32",
                   P(ks.stability, threshold=0.8), "stability"),
        MethodSpec("null-excess pca32 + stability >= 0.6", "pca32", ks.excess_with_stability,
                   "combination"),
        MethodSpec("prediction strength pca32 mean 0.8, 8 splits", "pca32",
                   P(ks.prediction_strength, how="mean", splits=8), "ps"),
        MethodSpec("prediction strength pca32 mean 0.85", "pca32",
                   P(ks.prediction_strength, how="mean", threshold=0.85), "ps"),
        MethodSpec("prediction strength pca64 mean 0.8", "pca64",
                   P(ks.prediction_strength, how="mean"), "ps"),
    ]
    for sp in ("pca32", "pca64"):
        for thr in (0.7, 0.8):
            for sc in ("excess", "sil"):
                out.append(MethodSpec(f"strength >= {thr} then {sc} {sp}", sp,
                                      P(ks.strength_then_score, threshold=thr, score=sc),
                                      "combination"))
    return out


RECOMMENDED = "choose_k: strength pca32 mean 0.8, 8 splits + null test (n >= 100)"


def _reference(ctx: ks.Ctx, kk: list[int], rng: np.random.Generator) -> ks.Choice:
    c = choose_k(ctx.z, kk, rng_seed=0)
    return ks.Choice(c.k, c.scores, c.structured,
                     note=f"excess {c.excess:.3f} margin {c.margin:+.2f} runner-up {c.runner_up}")


QUICK_METHODS = {RECOMMENDED, "silhouette raw", "silhouette pca32", "margin pca32 tol 0.01",
                 "null-excess raw", "null-excess pca32", "null-excess pca64",
                 "silhouette pca32 + null test"}


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


@dataclass
class Row:
    collection: str
    kind: str
    n: int
    true_k: int
    method: str
    k: int
    structured: bool | None
    ari: float  # at the chosen k (nan for true k = 1)
    ari_true: float  # at the true k, same space
    seconds: float
    note: str


def evaluate(coll: Collection, specs: list[MethodSpec]) -> list[Row]:
    rows: list[Row] = []
    with threadpool_limits(limits=1):
        ctxs = {sp: ks.Ctx(ks.project(coll.x, ks.space_dims(sp)))
                for sp in dict.fromkeys(m.space for m in specs)}
        kk = [k for k in KS if k < len(coll.x)]
        for m in specs:
            ctx = ctxs[m.space]
            t0 = time.perf_counter()
            ch = m.fn(ctx, kk, np.random.default_rng(0))
            dt = time.perf_counter() - t0
            if coll.true_k == 1:
                ari = ari_true = float("nan")
            else:
                ari_true = adjusted_rand_score(coll.y, ctx.labels(coll.true_k))
                ari = 0.0 if ch.k == 1 else adjusted_rand_score(coll.y, ctx.labels(ch.k))
            rows.append(Row(coll.name, coll.kind, len(coll.x), coll.true_k, m.name, ch.k,
                            ch.structured, ari, ari_true, dt, ch.note))
    return rows


def _eval_cached(coll: Collection, specs: list[MethodSpec]) -> list[Row]:
    f = CACHE / "results" / f"v{RESULTS_VERSION}-{_slug(coll.name)}.pkl"
    done: dict[str, Row] = pickle.loads(f.read_bytes()) if f.exists() else {}
    todo = [m for m in specs if m.name not in done]
    if todo:
        # Memoised fits are shared within one call; recompute the whole set for simplicity
        # only when something is missing.
        for r in evaluate(coll, todo):
            done[r.method] = r
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(pickle.dumps(done))
    return [done[m.name] for m in specs]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)[:80]


def _run(args: tuple[Collection, list[MethodSpec]]) -> list[Row]:
    t0 = time.perf_counter()
    rows = _eval_cached(*args)
    print(f"  {args[0].name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


# ------------------------------------------------------------------------------------------
# Scoring and tables
# ------------------------------------------------------------------------------------------


def k_ok(r: Row) -> bool:
    """The acceptance test for one collection: synthetic exact (k = 1 means 'unstructured'),
    real right or within one (and called structured)."""
    if r.kind == "synthetic":
        return r.k == r.true_k
    return r.k != 1 and abs(r.k - r.true_k) <= 1


@dataclass
class Summary:
    method: str
    ok: int
    total: int
    exact_synth: int
    n_synth: int
    within1_real: int
    n_real: int
    mean_ari: float
    mean_ari_true: float
    mean_ratio: float
    worst_ratio: float
    worst_collection: str
    unstructured_ok: str
    seconds: float

    @property
    def meets(self) -> bool:
        return self.ok == self.total and self.mean_ari >= 0.95 * self.mean_ari_true


def summarise(rows: list[Row]) -> Summary:
    scored = [r for r in rows if r.true_k > 1]
    ratios = [r.ari / r.ari_true if r.ari_true > 0 else 0.0 for r in scored]
    worst = int(np.argmin(ratios)) if ratios else 0
    k1 = [r for r in rows if r.true_k == 1]
    synth = [r for r in rows if r.kind == "synthetic"]
    real = [r for r in rows if r.kind == "real"]
    return Summary(
        method=rows[0].method, ok=sum(k_ok(r) for r in rows), total=len(rows),
        exact_synth=sum(k_ok(r) for r in synth), n_synth=len(synth),
        within1_real=sum(k_ok(r) for r in real), n_real=len(real),
        mean_ari=float(np.mean([r.ari for r in scored])),
        mean_ari_true=float(np.mean([r.ari_true for r in scored])),
        mean_ratio=float(np.mean(ratios)), worst_ratio=float(ratios[worst]),
        worst_collection=scored[worst].collection if scored else "",
        unstructured_ok=f"{sum(r.k == 1 for r in k1)}/{len(k1)}",
        seconds=float(np.mean([r.seconds for r in rows])))


def rank_key(s: Summary) -> tuple[float, ...]:
    """Worst first, then mean: failures of the k test, worst ARI ratio, mean ARI ratio."""
    return (-(s.total - s.ok), s.worst_ratio, s.mean_ratio)


def by_method(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.method, []).append(r)
    return out


def summary_table(rows: list[Row]) -> tuple[str, list[Summary]]:
    sums = sorted((summarise(v) for v in by_method(rows).values()), key=rank_key,
                  reverse=True)
    lines = ["| method | k ok | synthetic exact | real within 1 | k=1 called unstructured "
             "| mean ARI chosen / at true k | mean ratio | worst ratio (collection) "
             "| meets | mean s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sums:
        lines.append(
            f"| {s.method} | {s.ok}/{s.total} | {s.exact_synth}/{s.n_synth} | "
            f"{s.within1_real}/{s.n_real} | {s.unstructured_ok} | "
            f"{s.mean_ari:.3f} / {s.mean_ari_true:.3f} | {s.mean_ratio:.3f} | "
            f"{s.worst_ratio:.2f} ({s.worst_collection}) | {'yes' if s.meets else 'no'} | "
            f"{s.seconds:.2f} |")
    return "\n".join(lines), sums


def per_collection_table(rows: list[Row], chosen: list[str]) -> str:
    m = by_method(rows)
    head = "| collection | n | true k | ARI@true (pca32) | " + " | ".join(
        f"{c}: k (ARI)" for c in chosen) + " |"
    lines = [head, "|" + "---|" * (4 + len(chosen))]
    base = m[chosen[0]]
    for i, r0 in enumerate(base):
        cells = []
        for c in chosen:
            r = m[c][i]
            mark = "" if k_ok(r) else " **x**"
            ari = "-" if np.isnan(r.ari) else f"{r.ari:.3f}"
            cells.append(f"{r.k} ({ari}){mark}")
        at_true = "-" if np.isnan(m["silhouette pca32"][i].ari_true) else \
            f"{m['silhouette pca32'][i].ari_true:.3f}"
        lines.append(f"| {r0.collection} | {r0.n} | {r0.true_k} | {at_true} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def leave_one_out(rows: list[Row]) -> str:
    m = by_method(rows)
    names = list(m)
    colls = [r.collection for r in m[names[0]]]
    lines = ["| held out | true k | method chosen on the others | k | ok | ARI ratio |",
             "|---|---|---|---|---|---|"]
    picks: dict[str, int] = {}
    ok = 0
    ratios = []
    for i, c in enumerate(colls):
        best = max(names, key=lambda nm: rank_key(
            summarise([r for j, r in enumerate(m[nm]) if j != i])))
        picks[best] = picks.get(best, 0) + 1
        r = m[best][i]
        ok += k_ok(r)
        ratio = "-" if r.true_k == 1 else f"{(r.ari / r.ari_true if r.ari_true else 0):.2f}"
        if r.true_k > 1:
            ratios.append(r.ari / r.ari_true if r.ari_true else 0.0)
        lines.append(f"| {c} | {r.true_k} | {best} | {r.k} | {'yes' if k_ok(r) else 'no'} "
                     f"| {ratio} |")
    lines.append("")
    lines.append(f"Held-out k test passed on {ok}/{len(colls)}; held-out mean ARI ratio "
                 f"{np.mean(ratios):.3f}, worst {np.min(ratios):.2f}. Methods picked: "
                 + ", ".join(f"{k} ({v}x)" for k, v in picks.items()) + ".")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Cost on 20,000 rows
# ------------------------------------------------------------------------------------------


def cost() -> str:
    xc, _, _ = load("clothing10")
    rng = np.random.default_rng(5)
    # 20,000 rows: clothing10's photos, each drawn ~10 times with a small jitter.
    idx = rng.choice(len(xc), 20_000)
    x = ks.normalize_rows(xc[idx] + 0.01 * rng.standard_normal((20_000, xc.shape[1])))
    lines = ["| rows | rule | BLAS threads | seconds | k |", "|---|---|---|---|---|"]
    for n in (2_000, 20_000):
        for threads in (1, 2):
            with threadpool_limits(limits=threads):
                z = ks.project(x[:n], 32)
                t0 = time.perf_counter()
                kc = choose_k(z, KS, rng_seed=0)
                dt = time.perf_counter() - t0
                lines.append(f"| {n} | choose_k (reference) | {threads} | {dt:.1f} | {kc.k} |")
                t0 = time.perf_counter()
                c = ks.silhouette_k(ks.Ctx(z), KS, rng)
                dt = time.perf_counter() - t0
                lines.append(f"| {n} | old default (silhouette pca32) | {threads} | "
                             f"{dt:.1f} | {c.k} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="8 collections and the main methods only")
    ap.add_argument("--cost", action="store_true", help="also time the rule on 20,000 rows")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--show", nargs="*", default=None,
                    help="methods for the per-collection table (default: old vs recommended)")
    args = ap.parse_args()

    colls = real_collections() + synthetic_collections()
    if args.quick:
        keep = {"clothing five", "scenes6", "clothing hat/shoes (2)", "small 60: scenes 3 x 20",
                "synthetic k=1 gaussian (total cov.), 600", "synthetic k=3, 3 x 200 (a)",
                "synthetic k=5, 5 x 120 (a)", "synthetic k=8, 8 x 100 (a)"}
        colls = [c for c in colls if c.name in keep]
    specs = methods(args.quick)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        # Largest first, so the two workers finish together.
        order = sorted(colls, key=lambda c: -len(c.x))
        out = dict(zip([c.name for c in order],
                       pool.map(_run, [(c, specs) for c in order]), strict=True))
    rows = [r for c in colls for r in out[c.name]]
    print(f"{len(colls)} collections x {len(specs)} methods, k in {KS[0]}..{KS[-1]}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    table, sums = summary_table(rows)
    print("## Summary (ranked by failures of the k test, then worst, then mean ARI ratio)\n")
    print(table)
    show = args.show or ["silhouette pca32", sums[0].method]
    if sums[0].method == "silhouette pca32":
        show = ["silhouette pca32", sums[1].method]
    print("\n## Per collection: k chosen (ARI at that k); **x** = fails the k test\n")
    print(per_collection_table(rows, list(dict.fromkeys(show))))
    print("\n## Leave one collection out\n")
    print(leave_one_out(rows))
    if args.cost:
        print("\n## Cost\n")
        print(cost())


if __name__ == "__main__":
    main()
