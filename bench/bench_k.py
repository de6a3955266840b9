"""Choosing k across collections: which rule generalises.

    python bench/bench_k.py            # every collection and method (~25 min on 2 cores
                                       # from scratch; cached per collection after)
    python bench/bench_k.py --quick    # 8 collections, the main methods (~1-2 min)
    python bench/bench_k.py --cost     # also time the recommended rule on 20,000 rows
    python bench/bench_k.py --restarts # also KMeans at the true k with n_init 4 and 10
    python bench/bench_k.py --no-structure     # also three no-structure statistics
    python bench/bench_k.py --held-out # only handwritten digits, which no round saw

Embeddings come from bench/kstudy_embed.py (segd's own decode + embed path, cached as npz
under .cache/k-study/; run first, or it is run for you). Collections: clothing10 five and ten,
scenes6 (benchmark only, read in place), labelled sub-collections of those (random 3- and
4-class subsets, 2-class, unbalanced 4:1, small 32-150 photos), and synthetic mixtures on
the sphere in the 1280-d space with known k (k = 1, 3, 5, 8) whose within-cluster noise is
the real within-class residual covariance of clothing10 and whose overlap is set so that
KMeans at the true k scores an ARI like the real sets do. Held out (`--held-out`, kept out of
every other table): 15 collections of handwritten digits, which no round of the study
saw.

For every method and collection: chosen k, ARI at the chosen k (KMeans in the method's
space), ARI at the true k (same space), time. Summaries rank methods by their worst and
mean results, and a leave-one-collection-out pass picks the method on all collections but
one and reports it on the held-out one. segd's rule and a few variants also run at five
seeds (the halvings, KMeans' starts, the reference's draws): a rule is chosen by its results
over the seeds, never by one seed's. Labels are used only to score.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kselect_study as ks

from segd.core.kfigures import Known, LiveFigures
from segd.core.kselect import KChoice, KSelect, decide

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "k-study"
KS = list(range(2, 11))  # segd's default k range
FIVE = ("dress", "hat", "pants", "shoes", "t-shirt")
RESULTS_VERSION = 7
# kfigures.Known, by rows, k range and FigureSettings: raise it when kfigures computes any
# figure differently (the stored ones would otherwise stand for the new code).
FIGURES_VERSION = 1


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
        # More kinds than k_max: a mixed library (bench_stability's 2,000-photo case).
        Collection("clothing ten + scenes6 (16)", np.concatenate([xc, xs]),
                   np.concatenate([yc, ys + len(cc)]), "real"),
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


def _gauss(rng: np.random.Generator, base: np.ndarray, n: int) -> np.ndarray:
    """n Gaussian rows with the covariance of the rows of `base` (about its mean 0)."""
    return (rng.standard_normal((n, len(base))) @ base) / np.sqrt(len(base))


@dataclass
class SynthBasis:
    """clothing10's statistics the synthetic mixtures are drawn from."""

    gm: np.ndarray  # global mean
    total: np.ndarray  # rows minus the global mean
    resid: np.ndarray  # rows minus their class mean (within-class residuals)
    between: np.ndarray  # class means minus their mean

    @classmethod
    def of_clothing(cls) -> SynthBasis:
        xc, yc, _ = load("clothing10")
        x64 = xc.astype(np.float64)
        means = np.stack([x64[yc == c].mean(axis=0) for c in np.unique(yc)])
        gm = x64.mean(axis=0)
        return cls(gm, x64 - gm, x64 - means[yc], means - means.mean(axis=0))

    def mixture(self, rng: np.random.Generator, sizes: list[int], alpha: float,
                name: str) -> Collection:
        centres = self.gm + np.sqrt(alpha) * _gauss(rng, self.between, len(sizes))
        parts = [centres[i] + _gauss(rng, self.resid, n) for i, n in enumerate(sizes)]
        y = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
        return Collection(name, ks.normalize_rows(np.concatenate(parts)), y, "synthetic")


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
    basis = SynthBasis.of_clothing()
    rng = np.random.default_rng(2024)
    gm, total, resid = basis.gm, basis.total, basis.resid

    def gauss(base: np.ndarray, n: int) -> np.ndarray:
        return _gauss(rng, base, n)

    def mixture(sizes: list[int], alpha: float, name: str) -> Collection:
        return basis.mixture(rng, sizes, alpha, name)

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


def held_out_collections() -> list[Collection]:
    """Handwritten digits (bench/kstudy_embed.py), which no round of the study saw: all ten,
    random 2- to 5-class subsets, two unbalanced sets and three small ones, like the 33."""
    x, y, cl = load("digits")
    rng = np.random.default_rng(1797)
    out = [Collection("digits ten", x, y, "real")]
    for k, draws in ((2, 2), (3, 3), (4, 2), (5, 2)):
        for _ in range(draws):
            names = sorted(rng.choice(cl, k, replace=False).tolist())
            out.append(pick(x, y, cl, dict.fromkeys(names, 0), rng,
                            "digits " + "/".join(n.removeprefix("digit ") for n in names)))
    for sizes in ((150, 150, 40), (150, 40, 100, 40)):
        names = sorted(rng.choice(cl, len(sizes), replace=False).tolist())
        out.append(pick(x, y, cl, dict(zip(names, sizes, strict=True)), rng,
                        "unbalanced digits " + "/".join(
                            f"{n.removeprefix('digit ')} {m}" for n, m in zip(names, sizes,
                                                                               strict=True))))
    for k, per in ((4, 16), (5, 20), (6, 25)):
        names = sorted(rng.choice(cl, k, replace=False).tolist())
        out.append(pick(x, y, cl, dict.fromkeys(names, per), rng,
                        f"small {k * per}: digits {k} x {per}"))
    return out


PANEL_NS = (24, 32, 48, 64, 80, 100, 128)


def panel_collections() -> list[Collection]:
    """The small-n panel: balanced real sets of 24-128 photos (3, 4 or 5 random classes of
    clothing10 or scenes6, two draws per size and source; segd first fits at ~20-32 images)
    and small synthetic mixtures (k = 3 and 5 at 40, 80 and 120 points)."""
    xc, yc, cc = load("clothing10")
    xs, ys, cs = load("scenes6")
    rng = np.random.default_rng(77)
    out: list[Collection] = []
    for n in PANEL_NS:
        for src, (x, y, cl) in (("clothing", (xc, yc, cc)), ("scenes", (xs, ys, cs))):
            for k in rng.choice([3, 4, 5], 2, replace=False).tolist():
                names = sorted(rng.choice(cl, k, replace=False).tolist())
                per = n // k
                out.append(pick(x, y, cl, dict.fromkeys(names, per), rng,
                                f"panel {per * k}: {src} {k} x {per} ({'/'.join(names)})"))
    basis = SynthBasis.of_clothing()
    srng = np.random.default_rng(2025)
    for n in (40, 80, 120):
        for k in (3, 5):
            out.append(basis.mixture(srng, [n // k] * k, 2.5,
                                     f"panel {n // k * k}: synthetic k={k}, {k} x {n // k}"))
    return out


def elongated_collections() -> list[Collection]:
    """One blob each (k = 1), more elongated than clothing10's: its total covariance with
    the main axis stretched 2x and 3x, and spectra falling as 1/sqrt(i) and 1/i (600 rows in
    the 1280-d space around clothing10's mean direction)."""
    basis = SynthBasis.of_clothing()
    rng = np.random.default_rng(41)
    out: list[Collection] = []
    _, sv, vt = np.linalg.svd(basis.total, full_matrices=False)
    for stretch in (2.0, 3.0):
        scale = np.ones(len(sv))
        scale[0] = stretch
        base = (sv * scale)[:, None] * vt / np.sqrt(len(basis.total) / len(sv))
        out.append(Collection(f"unstructured, main axis x{stretch:g}, 600",
                              ks.normalize_rows(basis.gm + _gauss(rng, base, 600)),
                              np.zeros(600, int), "synthetic"))
    total_sd = float(np.sqrt((basis.total ** 2).sum() / len(basis.total)))
    for power in (0.5, 1.0):
        sd = np.arange(1, 1281, dtype=np.float64) ** -power
        sd *= total_sd / np.sqrt((sd ** 2).sum())
        q, _ = np.linalg.qr(rng.standard_normal((1280, 1280)))
        x = basis.gm + (rng.standard_normal((600, 1280)) * sd) @ q.T
        out.append(Collection(f"unstructured, spectrum 1/i^{power:g}, 600",
                              ks.normalize_rows(x), np.zeros(600, int), "synthetic"))
    return out


def clean_collections() -> list[Collection]:
    """Well-separated clusters, which the realistic mixtures above lack: k isotropic
    Gaussian blobs around random unit centres in the 1280-d space (nearly orthogonal there),
    noise of norm 1 or 2, re-normalised; KMeans at the true k is exact (ARI 1)."""
    rng = np.random.default_rng(31)
    out: list[Collection] = []
    def blobs(sizes: list[int], noise: float, name: str) -> Collection:
        centres = ks.normalize_rows(rng.standard_normal((len(sizes), 1280)))
        y = np.repeat(np.arange(len(sizes)), sizes)
        x = centres[y] + rng.standard_normal((len(y), 1280)) * (noise / np.sqrt(1280))
        return Collection(name, ks.normalize_rows(x), y, "synthetic")

    for k, per in ((2, 150), (3, 100), (5, 60), (8, 40)):
        for noise in (1.0, 2.0):
            out.append(blobs([per] * k, noise, f"clean k={k}, {k} x {per} (noise {noise})"))
    # Unequal sizes, as in tests/core: 25, 32, 39, ...
    for k in (5, 7):
        for draw in ("a", "b"):
            sizes = [25 + 7 * i for i in range(k)]
            out.append(blobs(sizes, 1.0, f"clean k={k}, {sum(sizes)} unequal ({draw})"))
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
    out += small_methods()
    if quick:
        return [m for m in out if m.name in QUICK_METHODS]
    out += [
        MethodSpec("calinski-harabasz pca32", "pca32", ks.calinski_harabasz, "index"),
        MethodSpec("davies-bouldin pca32", "pca32", ks.davies_bouldin, "index"),
        MethodSpec("gap (gaussian ref) pca32", "pca32", ks.gap_statistic, "gap"),
        MethodSpec("gaussian mixture (tied covariance) BIC pca32", "pca32", ks.mixture_bic,
                   "mixture"),
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
HYBRID_NS = (64, 100, 128, 150)
BOOTSTRAP_NS = (100, 150)
THRESHOLDS = (0.85, 0.9)
GUARDS = (0.02, 0.05, 0.1)


def hybrid_name(small: str, below: int, threshold: float = 0.8) -> str:
    what = {"silhouette": "silhouette", "splits32": "choose_k with 32 splits",
            "bootstrap": "bootstrap strength"}[small]
    thr = "" if threshold == 0.8 else f" (threshold {threshold})"
    return f"hybrid: {what} below {below}, else choose_k{thr}"


# segd's rule as shipped: segd.core.kselect.choose_k with its defaults.
DEFAULT = ("segd: silhouette below 64, else prediction strength (min over clusters) 0.6, "
           "step down 0.05 from strengths under 0.85, step up 0.01, angular reference (from "
           "150 rows: silhouette excess 0.03 or gap 0.1), KMeans n_init 10")
# The rules segd shipped after earlier rounds of the study, by round. The sixth's: the step
# down from any strength.
SIXTH = "segd of the sixth round: step down from any strength"
# The fifth's: that with the strength from 100 rows, the step up at 0.03.
FIFTH = "segd of the fifth round: strength from 100 rows, step up 0.03"
FIFTH_SETTINGS = {"n_init": 10, "excess_min": 0.03, "gap_min": 0.1}
# The fourth's: that with the silhouette's excess alone deciding the test (0.02).
FOURTH = "segd of the fourth round: silhouette excess 0.02 alone"
FOURTH_EXCESS = 0.02
# The third's: that with KMeans n_init 4, the base of the rows that vary one of its settings
# ("segd without the step down", "segd, min strength 0.5", ...).
THIRD = "segd of the third round: KMeans n_init 4, excess alone"
ROWS_BASE = {"excess_min": FOURTH_EXCESS, "gap_min": None, "n_init": 4, "small_below": 100,
             "step_up": 0.03, "step_down_below": math.inf}
# The second's: the third's with the silhouette below 150 rows (and the test from 100).
SECOND = "segd of the second round: silhouette below 150"
BELOW_150_SETTINGS = {"small_below": 150, "test_min_rows": 100}
# The first study's strength: the mean over clusters, threshold 0.8, no step down or up.
MEAN = {"aggregate": "mean", "threshold": 0.8, "step_up": None, "step_down": None}
# segd's rule after the first study: that strength, stepped down by the silhouette.
BEFORE = "segd before: silhouette below 150, else mean strength 0.8, step-down 0.05"
BEFORE_SETTINGS = dict(MEAN, step_down=0.05, **BELOW_150_SETTINGS)
# The third round's rule at other thresholds, and without each of its steps.
MIN_THRESHOLDS = (0.5, 0.7)
# Clusterwise stability (Hennig 2007) in place of the strength.
JACCARD_THRESHOLDS = (0.6, 0.7, 0.75, 0.8)
# Projections other than segd's default PCA-32 for segd's rule (raw 1280-d is not one: there
# the silhouette decides, and the angular reference needs more rows than dimensions).
OTHER_SPACES = ("pca16", "pca48", "pca64", "pca128")
SEEDS = (0, 1000, 2000, 3000, 4000)  # apart: the rule adds 0..splits to its seed
SEGD = "segd's rule"
# The strength from 64 rows and the step up at 0.01 (sixth round): finding 12.
SIXTH_SETTINGS = FIFTH_SETTINGS | {"small_below": 64, "step_up": 0.01}
# The step down only from strengths under 0.85 (seventh round): finding 13.
SEGD_SETTINGS = SIXTH_SETTINGS | {"step_down_below": 0.85}
# Each halving scored both ways, as fpc's prediction.strength does (eighth round): finding 14.
BOTH_WAYS = "segd, each halving scored both ways (as fpc)"
SEED_VARIANTS: dict[str, dict[str, Any]] = {
    SEGD: SEGD_SETTINGS,
    SIXTH: SIXTH_SETTINGS,
    BOTH_WAYS: SEGD_SETTINGS | {"both_ways": True},
    "segd, step down from strengths under 0.8": SEGD_SETTINGS | {"step_down_below": 0.8},
    "segd, step down from strengths under 0.9": SEGD_SETTINGS | {"step_down_below": 0.9},
    "segd, no step down": SEGD_SETTINGS | {"step_down": None},
    FIFTH: FIFTH_SETTINGS,
    FOURTH: {"n_init": 10},
    THIRD: {},
    "segd, step up at any lead (0)": SEGD_SETTINGS | {"step_up": 0.0},
    "segd, step up 0.02": SEGD_SETTINGS | {"step_up": 0.02},
    "segd, step up 0.03": SEGD_SETTINGS | {"step_up": 0.03},
    "segd, strength from 100 rows": SEGD_SETTINGS | {"small_below": 100},
    "segd (n_init 10, excess alone), strength from 64 rows": {"n_init": 10, "small_below": 64},
    "segd, 16 halvings": {"splits": 16},
    "segd, 32 halvings": {"splits": 32},
    "segd, 10 reference draws": {"null_draws": 10},
    "segd, 16 halvings and 10 reference draws": {"splits": 16, "null_draws": 10},
}
# Rows at seed 0 that have a name of their own.
AT_SEED_0 = {SEGD: DEFAULT, SIXTH: SIXTH, FIFTH: FIFTH, FOURTH: FOURTH, THIRD: THIRD}
# The study's own rows use the first reference: a Gaussian with z's mean and covariance.
GAUSS = "gaussian"


def small_methods() -> list[MethodSpec]:
    """The small-n candidates: each is the strength rule from `below` rows up."""
    P = functools.partial
    out = [MethodSpec(hybrid_name("silhouette", n), "pca32",
                      P(_hybrid, small="silhouette", below=n), "hybrid") for n in HYBRID_NS]
    out.append(MethodSpec(hybrid_name("splits32", 150), "pca32",
                          P(_hybrid, small="splits32", below=150), "hybrid"))
    out += [MethodSpec(hybrid_name("bootstrap", n), "pca32",
                       P(_hybrid, small="bootstrap", below=n), "hybrid") for n in BOOTSTRAP_NS]
    out += [MethodSpec(hybrid_name("silhouette", 150, t), "pca32",
                       P(_hybrid, small="silhouette", below=150, threshold=t), "hybrid")
            for t in THRESHOLDS]
    base = hybrid_name("silhouette", 150)
    out += [MethodSpec(f"{base}, silhouette guard {d}", "pca32",
                       P(_guarded, delta=d), "hybrid") for d in GUARDS]
    out += [MethodSpec(f"{base}, step-down guard {d}", "pca32",
                       P(_guarded, delta=d, local=True), "hybrid") for d in GUARDS]
    out += [MethodSpec(f"{base}, jump guard {d}", "pca32",
                       P(_guarded, delta=d, jump=True), "hybrid") for d in GUARDS]
    out.append(MethodSpec(BEFORE, "pca32", P(_segd, **BEFORE_SETTINGS), "hybrid"))
    out += [MethodSpec(f"segd, min strength {t}", "pca32", P(_segd, threshold=t), "hybrid")
            for t in MIN_THRESHOLDS]
    out.append(MethodSpec("segd without the step up", "pca32", P(_segd, step_up=None),
                          "hybrid"))
    out.append(MethodSpec("segd without the step down", "pca32", P(_segd, step_down=None),
                          "hybrid"))
    out.append(MethodSpec(SIXTH, "pca32", P(_segd, **SIXTH_SETTINGS), "hybrid"))
    out.append(MethodSpec(FIFTH, "pca32", P(_segd, **FIFTH_SETTINGS), "hybrid"))
    out.append(MethodSpec(FOURTH, "pca32", P(_segd, n_init=10), "hybrid"))
    out.append(MethodSpec(THIRD, "pca32", _segd, "hybrid"))
    out.append(MethodSpec("segd, strength from 64 rows", "pca32", P(_segd, small_below=64),
                          "hybrid"))
    out.append(MethodSpec(SECOND, "pca32", P(_segd, **BELOW_150_SETTINGS), "hybrid"))
    out.append(MethodSpec("segd, no-structure test from 100 rows", "pca32",
                          P(_segd, test_min_rows=100), "hybrid"))
    out += [MethodSpec(jaccard_name(t), "pca32", P(_jaccard, threshold=t), "hybrid")
            for t in JACCARD_THRESHOLDS]
    out.append(MethodSpec(DEFAULT, "pca32", _segd_now, "hybrid"))
    # The same rule, unchanged, on other projections (pca_dims): does PCA-32 carry over?
    out += [MethodSpec(space_name(sp), sp, _segd, "hybrid") for sp in OTHER_SPACES]
    # segd's rule and less noisy variants of it at other seeds (the halvings, KMeans'
    # starts, the reference's draws): a property of the rule, or of seed 0?
    out += [MethodSpec(seeded_name(v, seed), "pca32", P(_segd, seed=seed, **settings),
                       "hybrid")
            for v, settings in SEED_VARIANTS.items() for seed in SEEDS
            if seed != 0 or v not in AT_SEED_0]
    return out


def at_seed_0(rows: list[Row]) -> list[Row]:
    """`rows` without the variants' rows at seeds other than 0: those only feed the table
    over seeds (a rule is chosen, never a seed)."""
    drop = {seeded_name(v, seed) for v in SEED_VARIANTS for seed in SEEDS if seed != 0}
    return [r for r in rows if r.method not in drop]


def seeded_name(variant: str, seed: int) -> str:
    """The row of `variant` (a key of SEED_VARIANTS) at `seed`."""
    return AT_SEED_0[variant] if seed == 0 and variant in AT_SEED_0 else f"{variant}, seed {seed}"


def space_name(space: str) -> str:
    return f"segd's rule in {space.upper()} (pca_dims {ks.space_dims(space)})"


def jaccard_name(threshold: float) -> str:
    return (f"silhouette below 150, else clusterwise Jaccard (Hennig) >= {threshold}, "
            "angular test")


def _jaccard(ctx: ks.Ctx, kk: list[int], rng: np.random.Generator, *, threshold: float
             ) -> ks.Choice:
    if len(ctx.z) < 150:
        return _as_choice(segd_choice(ctx, kk, rule_of(rule="silhouette")))
    return ks.jaccard_with_angular_test(ctx, kk, rng, threshold=threshold)


def _note(c: KChoice) -> str:
    excess = "-" if c.excess is None else f"{c.excess:.3f}"
    margin = "-" if c.margin is None else f"{c.margin:.3f}"
    return f"{c.method}; excess {excess} margin {margin} runner-up {c.runner_up}"


def _as_choice(c: KChoice) -> ks.Choice:
    return ks.Choice(c.k, c.scores, c.structured, note=_note(c))


# Rows that differ only in how they decide (the strength's threshold, the steps, the test's
# thresholds) decide from the same figures: one kfigures.Known per rows, k range and
# FigureSettings (in ctx.figures, shared by a collection's spaces and kept on disk by
# `evaluate`), so that a rule added later replays on the figures stored.
def segd_choice(ctx: ks.Ctx, kk: list[int], settings: KSelect) -> KChoice:
    if settings not in ctx.memo:
        z, digest = _rows(ctx)
        known = ctx.figures.setdefault((digest, tuple(kk), settings.figures), Known())
        assert isinstance(known, Known)
        figures = LiveFigures(z, kk, settings.figures, known=known)
        ctx.memo[settings] = decide(len(z), kk, settings, figures)
    c = ctx.memo[settings]
    assert isinstance(c, KChoice)
    return c


def _rows(ctx: ks.Ctx) -> tuple[np.ndarray, str]:
    """ctx's rows as choose_k takes them (float32), and their digest (the figures' key)."""
    if _ROWS not in ctx.memo:
        z = np.ascontiguousarray(ctx.z, dtype=np.float32)
        ctx.memo[_ROWS] = z, hashlib.sha1(z.tobytes()).hexdigest()
    z, digest = ctx.memo[_ROWS]  # type: ignore[misc]
    return z, digest


_ROWS = "rows as float32, and their digest"


def _reference(ctx: ks.Ctx, kk: list[int], rng: np.random.Generator) -> ks.Choice:
    """The strength rule at every size (the no-structure test from 100 rows up)."""
    return _as_choice(segd_choice(ctx, kk, rule_of(small_below=0, reference=GAUSS, **MEAN)))


def _segd(ctx: ks.Ctx, kk: list[int], rng: np.random.Generator, **settings: Any
          ) -> ks.Choice:
    return _as_choice(segd_choice(ctx, kk, rule_of(**settings)))


def _segd_now(ctx: ks.Ctx, kk: list[int], rng: np.random.Generator) -> ks.Choice:
    """segd's rule as shipped: KSelect's defaults."""
    return _as_choice(segd_choice(ctx, kk, KSelect()))


def rule_of(**settings: Any) -> KSelect:
    """The study's rows: KSelect with `settings`, on the third round's rule unless they say
    otherwise (KMeans n_init 4, the silhouette's excess 0.02 alone, the strength from 100
    rows, the step up at 0.03: the base of every round before the fourth)."""
    return KSelect(**(ROWS_BASE | settings))


assert rule_of(**SEGD_SETTINGS) == KSelect(), "SEGD_SETTINGS must be KSelect's defaults"


def _hybrid(ctx: ks.Ctx, kk: list[int], rng: np.random.Generator, *, small: str, below: int,
            threshold: float = 0.8) -> ks.Choice:
    """= choose_k(z, kk, KSelect(small_below=below, reference="gaussian", **MEAN) with the
    threshold) for "silhouette", memoised on the branch taken; the other small-n
    rules are the study's."""
    if len(ctx.z) >= below:
        return _as_choice(segd_choice(ctx, kk, rule_of(small_below=0, reference=GAUSS,
                                                       **dict(MEAN, threshold=threshold))))
    if small == "silhouette":
        return _as_choice(segd_choice(ctx, kk, rule_of(rule="silhouette")))
    if small == "splits32":
        return _as_choice(segd_choice(ctx, kk, rule_of(small_below=0, splits=32,
                                                       reference=GAUSS, **MEAN)))
    assert small == "bootstrap", small
    if "bootstrap" not in ctx.memo:
        ctx.memo["bootstrap"] = ks.bootstrap_choice(ctx.z, kk)
    c = ctx.memo["bootstrap"]
    assert isinstance(c, KChoice)
    return _as_choice(c)


def _guarded(ctx: ks.Ctx, kk: list[int], rng: np.random.Generator, *,
             delta: float, local: bool = False, jump: bool = False) -> ks.Choice:
    """segd's rule, but among the ks that pass the strength threshold (up to the largest),
    the largest whose silhouette is within `delta` of the best of them: a coarser
    partition that is clearly more compact wins over a finer one that is merely
    reproducible (the strength averaged over clusters over-splits clean clusters).
    `local`: step down from the strength's k one k at a time, while the next smaller k
    passes too and its silhouette is higher by more than `delta`. `jump`: repeatedly, to the
    largest passing smaller k whose silhouette is higher by more than `delta`."""
    ch = _hybrid(ctx, kk, rng, small="silhouette", below=150)
    if len(ctx.z) < 150 or not ch.structured:
        return ch
    passing = [k for k in kk if ch.scores[k] >= 0.8 and k <= ch.k]
    if not passing:  # the silhouette decided (no k reproducible): nothing to guard
        return ch
    sil = {k: ctx.sil(k) for k in passing}
    if local:
        k = ch.k
        while k - 1 in sil and sil[k - 1] > sil[k] + delta:
            k -= 1
    elif jump:
        k = ch.k
        while better := [kk for kk in sil if kk < k and sil[kk] > sil[k] + delta]:
            k = max(better)
    else:
        best = max(sil.values())
        k = max(k for k in passing if sil[k] >= best - delta)
    return ks.Choice(k, ch.scores, True, note=f"{ch.note}; guard {delta}: {ch.k} -> {k}")


def panel_methods() -> set[str]:
    """The rules run on all 83 collections (and on the digits)."""
    return {RECOMMENDED, "silhouette pca32", *(m.name for m in small_methods())}


PANEL_METHODS = panel_methods()


def use_seeds(n: int) -> None:
    """Run the seeded variants at n seeds, 0, 1000, ... (every table over seeds follows)."""
    global SEEDS, PANEL_METHODS
    SEEDS = tuple(range(0, 1000 * n, 1000))
    PANEL_METHODS = panel_methods()


QUICK_METHODS = {RECOMMENDED, DEFAULT, "silhouette raw", "silhouette pca32",
                 "margin pca32 tol 0.01", "null-excess raw", "null-excess pca32",
                 "null-excess pca64", "silhouette pca32 + null test"}


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
    figures = load_figures(coll)
    with threadpool_limits(limits=1):
        ctxs = {sp: ks.Ctx(ks.project(coll.x, ks.space_dims(sp)), figures=figures)
                for sp in dict.fromkeys(m.space for m in specs)}
        for m in specs:
            ctx = ctxs[m.space]
            t0 = time.perf_counter()
            ch = m.fn(ctx, k_range(coll), np.random.default_rng(0))
            dt = time.perf_counter() - t0
            ari, ari_true = aris(coll, ctx, ch.k)
            rows.append(Row(coll.name, coll.kind, len(coll.x), coll.true_k, m.name, ch.k,
                            ch.structured, ari, ari_true, dt, ch.note))
    store(figures_file(coll), figures)
    return rows


def k_range(coll: Collection) -> list[int]:
    return [k for k in KS if k < len(coll.x)]


def aris(coll: Collection, ctx: ks.Ctx, k: int) -> tuple[float, float]:
    """ARI at k and at the true k (KMeans in ctx's space, seed 0; nan for true k = 1)."""
    if coll.true_k == 1:
        return float("nan"), float("nan")
    ari_true = adjusted_rand_score(coll.y, ctx.labels(coll.true_k))
    return (0.0 if k == 1 else adjusted_rand_score(coll.y, ctx.labels(k))), ari_true


def figures_file(coll: Collection) -> Path:
    return CACHE / "figures" / f"v{FIGURES_VERSION}-{_slug(coll.name)}.pkl"


def load_figures(coll: Collection) -> dict[object, object]:
    """The figures stored for coll's rows (see `segd_choice`), or none."""
    f = figures_file(coll)
    return pickle.loads(f.read_bytes()) if f.exists() else {}


def _eval_cached(coll: Collection, specs: list[MethodSpec]) -> list[Row]:
    f = CACHE / "results" / f"v{RESULTS_VERSION}-{_defaults_tag()}-{_slug(coll.name)}.pkl"
    done: dict[str, Row] = pickle.loads(f.read_bytes()) if f.exists() else {}
    todo = [m for m in specs if m.name not in done]
    if todo:
        # Memoised fits are shared within one call; recompute the whole set for simplicity
        # only when something is missing.
        for r in evaluate(coll, todo):
            done[r.method] = r
        store(f, done)
    return [done[m.name] for m in specs]


def store(path: Path, value: object) -> None:
    """Pickle `value` to `path` whole or not at all (a bench stopped midway)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_bytes(pickle.dumps(value))
    part.replace(path)


def _defaults_tag() -> str:
    """Rows are cached by name, and most rows build on KSelect's defaults: a changed default
    gives them another file, so that no row keeps a result of the old settings."""
    return hashlib.sha256(repr(KSelect()).encode()).hexdigest()[:8]


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
    real right or within one (and called structured); with more classes than k_max, right
    means as near as the range allows."""
    if r.kind == "synthetic":
        return r.k == r.true_k
    return r.k != 1 and abs(r.k - min(r.true_k, KS[-1])) <= 1


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


def over_seeds_table(rows: list[Row]) -> str:
    """Per variant of SEED_VARIANTS: the k tests and the mean ARI ratio at each seed, the
    worst ratio over all seeds, the worst on real photos at each seed, and how many
    collections do not get one k at every seed."""
    grouped = by_method(rows)
    lines = ["| variant | k ok per seed | mean | mean ratio per seed | mean | mean ARI chosen "
             "/ at true k per seed | worst ratio (collection) | worst on real photos per seed "
             "| unstructured called so | k moves with the seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in SEED_VARIANTS:
        runs = [grouped[n] for seed in SEEDS if (n := seeded_name(v, seed)) in grouped]
        if not runs:
            continue
        sums = [summarise(rs) for rs in runs]
        real = [summarise([r for r in rs if r.kind == "real"]) for rs in runs]
        worst = min(sums, key=lambda x: x.worst_ratio)
        chosen: dict[str, set[int]] = {}
        for r in itertools.chain.from_iterable(runs):
            chosen.setdefault(r.collection, set()).add(r.k)
        lines.append(
            f"| {v} | {', '.join(str(x.ok) for x in sums)} of {sums[0].total} | "
            f"{np.mean([x.ok for x in sums]):.1f} | "
            f"{', '.join(f'{x.mean_ratio:.3f}' for x in sums)} | "
            f"{np.mean([x.mean_ratio for x in sums]):.3f} | "
            f"{', '.join(f'{x.mean_ari / x.mean_ari_true:.3f}' for x in sums)} | "
            f"{worst.worst_ratio:.2f} ({worst.worst_collection}) | "
            f"{', '.join(f'{x.worst_ratio:.2f}' for x in real)} | "
            f"{', '.join(x.unstructured_ok for x in sums)} | "
            f"{sum(len(k) > 1 for k in chosen.values())} of {len(chosen)} |")
    return "\n".join(lines)


# The eighth round's candidate: the strength scored both ways; the seventh round's: segd's
# rule, the sixth round's, and the step down from other strengths or none; and the sixth
# round's: the step up's and the strength's settings.
ROUND_CANDIDATES = (SEGD, BOTH_WAYS, SIXTH, "segd, step down from strengths under 0.8",
                    "segd, step down from strengths under 0.9", "segd, no step down", FIFTH,
                    "segd, step up at any lead (0)", "segd, step up 0.02",
                    "segd, step up 0.03", "segd, strength from 100 rows")


def leave_one_out_over_seeds(rows: list[Row], variants: tuple[str, ...] = ROUND_CANDIDATES
                             ) -> str:
    """Leave one collection out among `variants` of SEED_VARIANTS, each judged on all the
    seeds at once: chosen on the other collections (rank_key), how does it do on the one
    left out, at each seed?"""
    grouped = by_method(rows)
    variants = tuple(v for v in variants if all(seeded_name(v, s) in grouped for s in SEEDS))
    if len(variants) < 2:
        return "(not run: fewer than two of the candidates have rows at every seed)"
    runs = {v: [r for seed in SEEDS for r in grouped[seeded_name(v, seed)]] for v in variants}
    colls = list(dict.fromkeys(r.collection for r in runs[variants[0]]))
    picks: dict[str, int] = {}
    ok = total = 0
    ratios: list[float] = []
    for c in colls:
        best = max(variants, key=lambda v: rank_key(
            summarise([r for r in runs[v] if r.collection != c])))
        picks[best] = picks.get(best, 0) + 1
        held = [r for r in runs[best] if r.collection == c]
        ok += sum(k_ok(r) for r in held)
        total += len(held)
        ratios += [r.ari / r.ari_true if r.ari_true else 0.0 for r in held if r.true_k > 1]
    return (f"Held-out k test passed {ok} times of {total} ({len(colls)} collections x "
            f"{len(SEEDS)} seeds); held-out mean ARI ratio {np.mean(ratios):.3f}, worst "
            f"{np.min(ratios):.2f}. Picked: "
            + ", ".join(f"{v} ({n}x)" for v, n in picks.items()) + ".")


def rank_key(s: Summary) -> tuple[float, ...]:
    """Worst first, then mean: failures of the k test, worst ARI ratio, mean ARI ratio."""
    return (-(s.total - s.ok), s.worst_ratio, s.mean_ratio)


def ari_key(s: Summary) -> tuple[float, ...]:
    """By the clustering itself: worst ARI ratio, then mean ARI ratio, then the k test (the
    k test's "within one" counts k = 2 for 3 classes as right whatever the ARI)."""
    return (s.worst_ratio, s.mean_ratio, -(s.total - s.ok))


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
    """k (ARI) per collection for the `chosen` methods that have rows (--quick runs few)."""
    m = by_method(rows)
    chosen = [c for c in dict.fromkeys(chosen) if c in m]
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


def leave_one_out(rows: list[Row],
                  key: Callable[[Summary], tuple[float, ...]] = rank_key) -> str:
    m = by_method(rows)
    names = list(m)
    colls = [r.collection for r in m[names[0]]]
    lines = ["| held out | true k | method chosen on the others | k | ok | ARI ratio |",
             "|---|---|---|---|---|---|"]
    picks: dict[str, int] = {}
    ok = 0
    ratios = []
    for i, c in enumerate(colls):
        best = max(names, key=lambda nm: key(
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


def held_out(show: list[str], jobs: int) -> str:
    """The small-n candidates (every rule of segd's family, at SEEDS) on the held-out
    collections: the rule the study chose on the others, tried where nothing was tuned."""
    colls = held_out_collections()
    specs = [m for m in methods() if m.name in PANEL_METHODS]
    with ProcessPoolExecutor(jobs) as pool:
        out = dict(zip([c.name for c in colls], pool.map(_run, [(c, specs) for c in colls]),
                       strict=True))
    rows = [r for c in colls for r in out[c.name]]
    called_flat = {r.collection for r in rows if r.method == DEFAULT and r.k == 1}
    flat = [c for c in synthetic_collections() if c.true_k == 1] + elongated_collections()
    return "\n".join([
        f"## Held out: {len(colls)} collections of handwritten digits x {len(specs)} rules\n",
        summary_table(at_seed_0(rows))[0],
        "\n## Per collection: k chosen (ARI at that k); **x** = fails the k test\n",
        per_collection_table(rows, show),
        f"\n## segd's rule and variants at seeds {', '.join(map(str, SEEDS))}\n",
        over_seeds_table(rows),
        "\n## The no-structure statistics at every k: the digits segd's rule calls one "
        "cluster, and the study's unstructured sets\n",
        excess_by_k_table([c for c in colls if c.name in called_flat] + flat)])


def excess_by_k_table(colls: list[Collection]) -> str:
    """The silhouette's excess and the gap over 3 angular references (seed 0, n_init 10) at
    each k of KS: segd's test judges one k; would any k tell the sets apart?"""
    from segd.core.kfigures import angular_reference

    lines = ["| collection | statistic | " + " | ".join(f"k={k}" for k in KS) + " | max |",
             "|---|---|" + "---|" * (len(KS) + 1)]
    with threadpool_limits(limits=1):
        for c in colls:
            z = ks.project(c.x, ks.space_dims("pca32"))
            rng = np.random.default_rng(0)
            refs = [angular_reference(z, rng, len(z)) for _ in range(NULL_DRAWS)]
            excess, gap = zip(*(_against_references(z, refs, k, 0) for k in KS), strict=True)
            for name, vals in (("excess", excess), ("gap", gap)):
                lines.append(f"| {c.name} | {name} | " + " | ".join(f"{v:+.3f}" for v in vals)
                             + f" | {max(vals):+.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Cost on 20,000 rows
# ------------------------------------------------------------------------------------------


def cost() -> str:
    """segd's whole fit (cluster.fit: projection, choosing k, final KMeans, assignment; one
    BLAS thread, as it always runs) with each k_rule, on clothing10's photos resampled with a
    small jitter."""
    from segd.core.cluster import FitParams, fit

    xc, _, _ = load("clothing10")
    rng = np.random.default_rng(5)
    idx = rng.choice(len(xc), 20_000)
    x = ks.normalize_rows(xc[idx] + 0.01 * rng.standard_normal((20_000, xc.shape[1])))
    lines = ["| rows | k_rule | fit s | of which choosing k | k | rule that chose |",
             "|---|---|---|---|---|---|"]
    for n in (2_000, 20_000):
        for rule in ("silhouette", "strength"):
            params = FitParams(k_rule=rule)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            r = fit(x[:n], params)
            dt = time.perf_counter() - t0
            fixed = fit(x[:n], FitParams(k=r.k))  # the same fit without choosing
            lines.append(f"| {n:,} | {rule} | {dt:.1f} | {dt - fixed.duration_s:.1f} | {r.k} "
                         f"| {r.rule} |")
    return "\n".join(lines)


RESTARTS = (4, 10)
RESTART_SEEDS = 5
EXCESS_SEEDS = (0, 1000)
NULL_DRAWS = 3  # as KSelect.null_draws


@dataclass(frozen=True)
class NullStats:
    """Three no-structure statistics at the strength's k, each the rows' figure minus the
    mean of the same 3 angular references'."""

    collection: str
    true_k: int
    seed: int
    k: int
    silhouette: float  # segd's test
    strength: float
    gap: float  # log inertia: the references' minus the rows' (Tibshirani's gap)


def _null_stats(coll: Collection) -> list[NullStats]:
    """Per seed, k = the largest k whose strength reaches 0.6 (else the strongest)."""
    from segd.core.kfigures import angular_reference, prediction_strength

    n_init = KSelect().n_init
    out = []
    with threadpool_limits(limits=1):
        z = ks.project(coll.x, ks.space_dims("pca32"))
        for seed in EXCESS_SEEDS:
            rng = np.random.default_rng(seed)
            strength = prediction_strength(z, KS, rng, seed=seed, n_init=n_init)
            k = max((k for k in KS if strength[k] >= 0.6), default=max(KS, key=strength.get))
            refs = [angular_reference(z, rng, len(z)) for _ in range(NULL_DRAWS)]
            excess, gap = _against_references(z, refs, k, seed)
            ref_strength = [prediction_strength(r, [k], rng, seed=seed + 1 + d,
                                                n_init=n_init)[k] for d, r in enumerate(refs)]
            out.append(NullStats(coll.name, coll.true_k, seed, k, silhouette=excess,
                                 strength=strength[k] - float(np.mean(ref_strength)), gap=gap))
    return out


def _against_references(z: np.ndarray, refs: list[np.ndarray], k: int, seed: int
                        ) -> tuple[float, float]:
    """KMeans(k) on the rows and on each reference (n_init as segd's): the silhouette's
    excess over the references' mean, and the gap (their mean log inertia minus the rows')."""
    from sklearn.metrics import silhouette_score

    n_init = KSelect().n_init
    fit = ks.kmeans(z, k, seed, n_init=n_init)
    ref_fits = [ks.kmeans(r, k, seed + 1 + d, n_init=n_init) for d, r in enumerate(refs)]
    excess = silhouette_score(z, fit.labels_) - np.mean(
        [silhouette_score(r, f.labels_) for r, f in zip(refs, ref_fits, strict=True)])
    gap = np.mean([np.log(f.inertia_) for f in ref_fits]) - np.log(fit.inertia_)
    return float(excess), float(gap)


def no_structure_stats(jobs: int) -> str:
    """The three statistics on every collection of 150 rows or more (segd tests from 150):
    how far apart are the unstructured sets and the structured ones?"""
    colls = [c for c in real_collections() + synthetic_collections() + panel_collections()
             + clean_collections() + elongated_collections() if len(c.x) >= 150]
    with ProcessPoolExecutor(jobs) as pool:
        rows = sorted((r for rs in pool.map(_null_stats, colls) for r in rs),
                      key=lambda r: r.gap)
    lines = ["| collection | true k | seed | k | silhouette excess | strength excess | gap |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.collection} | {r.true_k} | {r.seed} | {r.k} | {r.silhouette:+.3f} | "
              f"{r.strength:+.3f} | {r.gap:+.3f} |" for r in rows]
    lines.append(f"\n{len(colls)} collections x {len(EXCESS_SEEDS)} seeds, "
                 f"n_init {KSelect().n_init}:")
    for stat in ("silhouette", "strength", "gap"):
        flat = max(getattr(r, stat) for r in rows if r.true_k == 1)
        low = min(rows, key=lambda r: getattr(r, stat) if r.true_k > 1 else np.inf)
        lines.append(f"- {stat}: unstructured up to {flat:+.3f}; structured from "
                     f"{getattr(low, stat):+.3f} ({low.collection}, seed {low.seed})")
    lines.append("\n" + thresholds_left_out(rows))
    return "\n".join(lines)


Thresholds = tuple[float, float | None]  # (excess_min, gap_min)
EXCESS_GRID = tuple(round(0.005 * i, 3) for i in range(1, 13))  # 0.005..0.06
GAP_GRID = (None, *(round(0.025 * i, 3) for i in range(1, 17)))  # off, 0.025..0.4


def _passes(r: NullStats, t: Thresholds) -> bool:
    """segd's test on the statistics: the silhouette's excess, or else the gap."""
    excess_min, gap_min = t
    return r.silhouette >= excess_min or (gap_min is not None and r.gap >= gap_min)


def _right(r: NullStats, t: Thresholds) -> bool:
    return _passes(r, t) == (r.true_k > 1)


def _clearance(rows: list[NullStats], t: Thresholds) -> float:
    """The row nearest the test's boundary: its distance, each figure over its threshold
    (negative: on the wrong side)."""
    excess_min, gap_min = t

    def inside(r: NullStats) -> float:  # > 0: passes
        by_gap = -np.inf if gap_min is None else (r.gap - gap_min) / gap_min
        return max((r.silhouette - excess_min) / excess_min, by_gap)

    return min(inside(r) if r.true_k > 1 else -inside(r) for r in rows)


def best_thresholds(rows: list[NullStats]) -> Thresholds:
    """The grid's thresholds with the fewest wrong calls, then the widest clearance."""
    return max(itertools.product(EXCESS_GRID, GAP_GRID),
               key=lambda t: (sum(_right(r, t) for r in rows), _clearance(rows, t)))


def thresholds_left_out(rows: list[NullStats]) -> str:
    """Leave one collection out over the test's thresholds: chosen on the others, are the
    left-out collection's seeds called right?"""
    names = list(dict.fromkeys(r.collection for r in rows))
    every = best_thresholds(rows)
    lines = [f"Thresholds (excess_min, gap_min) chosen on all {len(names)}: {every}, "
             f"{sum(not _right(r, every) for r in rows)} wrong calls of {len(rows)}. "
             "Leave one collection out (only those whose choice or call differs):"]
    for name in names:
        t = best_thresholds([r for r in rows if r.collection != name])
        wrong = [r.seed for r in rows if r.collection == name and not _right(r, t)]
        if wrong or t != every:
            lines.append(f"- without {name}: {t}; it is called wrong at seeds {wrong}")
    now = KSelect()
    for t in ((FOURTH_EXCESS, None), (now.excess_min, None),
              (now.excess_min, now.gap_min)):
        wrong_calls = [f"{r.collection} (seed {r.seed})" for r in rows if not _right(r, t)]
        lines.append(f"- {t}: {len(wrong_calls)} wrong: {', '.join(wrong_calls) or '-'}")
    return "\n".join(lines)


def _restart_aris(coll: Collection) -> tuple[str, dict[int, list[float]]]:
    with threadpool_limits(limits=1):
        z = ks.project(coll.x, ks.space_dims("pca32"))
        return coll.name, {n: [adjusted_rand_score(coll.y, ks.kmeans(z, coll.true_k, seed,
                                                                    n_init=n).labels_)
                               for seed in range(RESTART_SEEDS)] for n in RESTARTS}


def restarts(jobs: int) -> str:
    """KMeans at the true k with each number of restarts in RESTARTS, over the labelled
    collections of the 33 and RESTART_SEEDS seeds: the ARI the final fit gets."""
    colls = [c for c in real_collections() + synthetic_collections() if c.true_k > 1]
    with ProcessPoolExecutor(jobs) as pool:
        out = dict(pool.map(_restart_aris, colls))
    lo, hi = RESTARTS
    mean = {n: [float(np.mean(out[c.name][n])) for c in colls] for n in RESTARTS}
    better = sum(b > a for a, b in zip(mean[lo], mean[hi], strict=True))
    worse = sum(b < a for a, b in zip(mean[lo], mean[hi], strict=True))
    return (f"{len(colls)} collections x {RESTART_SEEDS} seeds, PCA-32: mean ARI at the true k "
            f"{np.mean(mean[lo]):.3f} with n_init {lo}, {np.mean(mean[hi]):.3f} with {hi} "
            f"({hi} better on {better} collections, worse on {worse})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="8 collections and the main methods only")
    ap.add_argument("--cost", action="store_true", help="also time the rule on 20,000 rows")
    ap.add_argument("--restarts", action="store_true",
                    help="also KMeans' ARI at the true k with 4 and 10 restarts")
    ap.add_argument("--no-structure", action="store_true",
                    help="also three no-structure statistics against the same references")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--show", nargs="*", default=None,
                    help="methods for the per-collection table (default: old vs recommended)")
    ap.add_argument("--held-out", action="store_true",
                    help="only the collections no round of the study saw (handwritten digits)")
    ap.add_argument("--seeds", type=int, default=len(SEEDS),
                    help=f"the variants over seeds at this many (default {len(SEEDS)}: "
                         f"{', '.join(map(str, SEEDS))})")
    args = ap.parse_args()
    if args.seeds != len(SEEDS):
        use_seeds(args.seeds)
    show = args.show or ["silhouette pca32", BEFORE, THIRD, FOURTH, FIFTH, SIXTH, DEFAULT]
    if args.held_out:
        print(held_out(show, args.jobs))
        return

    colls = real_collections() + synthetic_collections()
    if args.quick:
        keep = {"clothing five", "scenes6", "clothing hat/shoes (2)", "small 60: scenes 3 x 20",
                "synthetic k=1 gaussian (total cov.), 600", "synthetic k=3, 3 x 200 (a)",
                "synthetic k=5, 5 x 120 (a)", "synthetic k=8, 8 x 100 (a)"}
        colls = [c for c in colls if c.name in keep]
    specs = methods(args.quick)
    panel = [] if args.quick else panel_collections()
    clean = [] if args.quick else clean_collections()
    flat = [] if args.quick else elongated_collections()
    extra_specs = [m for m in specs if m.name in PANEL_METHODS]
    t0 = time.perf_counter()
    jobs = [(c, specs) for c in colls] + [(c, extra_specs) for c in panel + clean + flat]
    with ProcessPoolExecutor(args.jobs) as pool:
        # Largest first, so the two workers finish together.
        jobs.sort(key=lambda j: -len(j[0].x))
        out = dict(zip([j[0].name for j in jobs], pool.map(_run, jobs), strict=True))
    rows = [r for c in colls for r in out[c.name]]
    print(f"{len(colls)} collections x {len(specs)} methods (+ {len(panel)} small, "
          f"{len(clean)} well-separated and {len(flat)} elongated unstructured x "
          f"{len(extra_specs)}), k in {KS[0]}..{KS[-1]}, "
          f"{time.perf_counter() - t0:.0f} s\n")
    rows0 = at_seed_0(rows)
    table, _ = summary_table(rows0)
    print("## Summary (ranked by failures of the k test, then worst, then mean ARI ratio)\n")
    print(table)
    print("\n## Per collection: k chosen (ARI at that k); **x** = fails the k test\n")
    print(per_collection_table(rows, show))
    print("\n## Leave one collection out\n")
    print(leave_one_out(rows0))
    print(f"\n## segd's rule and variants at seeds {', '.join(map(str, SEEDS))}\n")
    print(over_seeds_table(rows))
    print("\n## Leave one collection out among the candidates of the last three rounds, "
          f"{len(SEEDS)} seeds\n")
    print(leave_one_out_over_seeds(rows))
    if panel:
        prow = [r for c in panel for r in out[c.name]]
        crow = [r for c in clean for r in out[c.name]]
        frow = [r for c in flat for r in out[c.name]]
        both = [r for r in rows if r.method in PANEL_METHODS] + prow + crow + frow
        both0 = at_seed_0(both)
        print(f"\n## Small-n panel ({len(panel)} collections of 20-128)\n")
        print(summary_table(at_seed_0(prow))[0])
        print(f"\n## Well-separated ({len(clean)})\n")
        print(summary_table(at_seed_0(crow))[0])
        print(f"\n## Elongated unstructured ({len(flat)}): k chosen\n")
        for name, rs in by_method(frow).items():
            print(f"- {name}: " + ", ".join(str(r.k) for r in rs))
        print(f"\n## All together ({len(both) // len(extra_specs)})\n")
        print(summary_table(both0)[0])
        print(f"\n## All together ({len(both) // len(extra_specs)}), at seeds "
              f"{', '.join(map(str, SEEDS))}\n")
        print(over_seeds_table(both))
        print("\n## Leave one collection out among the candidates of the last three rounds, "
              f"{len(SEEDS)} seeds, all together\n")
        print(leave_one_out_over_seeds(both))
        print("\n## Panel and well-separated, per collection\n")
        print(per_collection_table(prow + crow, show))
        print("\n## Leave one collection out, all together, among the small-n candidates\n")
        print(leave_one_out(both0))
        print("\n## The same, ranked by worst, then mean ARI ratio, then the k test\n")
        print(leave_one_out(both0, ari_key))
        print("\n## All together, ranked by worst, then mean ARI ratio, then the k test\n")
        both_sums = sorted((summarise(v) for v in by_method(both0).values()), key=ari_key,
                           reverse=True)
        print("\n".join(f"{s.method}: worst {s.worst_ratio:.2f} ({s.worst_collection}), mean "
                        f"{s.mean_ratio:.3f}, k ok {s.ok}/{s.total}" for s in both_sums))
    if args.cost:
        print("\n## Cost\n")
        print(cost())
    if args.restarts:
        print("\n## Restarts of the final fit\n")
        print(restarts(args.jobs))
    if args.no_structure:
        print("\n## No-structure statistics\n")
        print(no_structure_stats(args.jobs))


if __name__ == "__main__":
    main()
