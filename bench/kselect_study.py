"""Candidate rules for choosing the number of clusters k, for the k study (bench_k.py).

Pure numpy / scikit-learn / scipy, and segd's own rule (segd.core.kselect) for the variants
built on it. Every method is a function

    method(ctx: Ctx, ks: list[int], rng: np.random.Generator) -> Choice

where `ctx` holds the points of one collection in one space (raw cosine space or a segd-style
PCA projection) and memoises KMeans fits and silhouettes, so that methods sharing a fit do not
pay for it twice. `Choice.k` is the chosen k (1 = "no structure" for the methods that can say
so), `Choice.scores` the per-k criterion, `Choice.structured` the verdict of the method's own
no-structure test (None when it has none).

Spaces: "raw" = the L2-normalised embeddings (Euclidean distance there is the cosine
distance); "pcaP" = segd's projection (centre, top P principal components, re-normalise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)
from sklearn.mixture import GaussianMixture

from segd.core.kfigures import angular_reference
from segd.core.kselect import KChoice

N_INIT = 4
SIL_SAMPLE = 4000


# ------------------------------------------------------------------------------------------
# Spaces
# ------------------------------------------------------------------------------------------


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def project(x: np.ndarray, dims: int) -> np.ndarray:
    """segd's projection: centre, top `dims` principal components, re-normalise (0 = none)."""
    if dims <= 0:
        return normalize_rows(x)
    x64 = np.asarray(x, dtype=np.float64)
    centred = x64 - x64.mean(axis=0)
    dims = min(dims, x.shape[1], max(len(x) - 1, 1))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return normalize_rows(centred @ vt[:dims].T)


def space_dims(space: str) -> int:
    return 0 if space == "raw" else int(space.removeprefix("pca"))


# ------------------------------------------------------------------------------------------
# Memoised fits
# ------------------------------------------------------------------------------------------


def kmeans(z: np.ndarray, k: int, seed: int, n_init: int = N_INIT) -> KMeans:
    return KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(z)


def silhouette(z: np.ndarray, labels: np.ndarray, seed: int, sample: int = SIL_SAMPLE) -> float:
    if len(np.unique(labels)) < 2:
        return -1.0
    return float(silhouette_score(z, labels, sample_size=min(sample, len(z)),
                                  random_state=seed))


@dataclass
class Ctx:
    """One collection in one space, with memoised KMeans fits (seed, k) and silhouettes."""

    z: np.ndarray
    _fits: dict[tuple[int, int], KMeans] = field(default_factory=dict)
    _sil: dict[tuple[int, int, int], float] = field(default_factory=dict)
    _null: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    _null_sil: dict[tuple[int, int, int], float] = field(default_factory=dict)
    memo: dict[object, object] = field(default_factory=dict)
    """Results of whole rules, shared by the methods built on them."""
    figures: dict[object, object] = field(default_factory=dict)
    """segd's figures (kfigures.Known) by rows, k range and settings, shared by its rules."""

    def fit(self, k: int, seed: int = 0) -> KMeans:
        key = (k, seed)
        if key not in self._fits:
            self._fits[key] = kmeans(self.z, k, seed)
        return self._fits[key]

    def labels(self, k: int, seed: int = 0) -> np.ndarray:
        return self.fit(k, seed).labels_

    def sil(self, k: int, seed: int = 0, sample: int = SIL_SAMPLE) -> float:
        key = (k, seed, sample)
        if key not in self._sil:
            self._sil[key] = silhouette(self.z, self.labels(k, seed), seed, sample)
        return self._sil[key]

    def null_draw(self, draw: int, n_max: int = 0) -> np.ndarray:
        """Unstructured reference data: a Gaussian with this collection's mean and
        covariance (its full PCA spectrum), re-normalised like the data; `n_max` > 0 caps
        the number of rows (same dimension)."""
        key = (draw, n_max)
        if key not in self._null:
            self._null[key] = gaussian_reference(self.z, np.random.default_rng(1000 + draw),
                                                 n_max)
        return self._null[key]


def gaussian_reference(z: np.ndarray, rng: np.random.Generator, n_max: int = 0) -> np.ndarray:
    z64 = np.asarray(z, dtype=np.float64)
    mean = z64.mean(axis=0)
    centred = z64 - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    sd = s / np.sqrt(max(len(z) - 1, 1))
    n = len(z) if n_max <= 0 else min(n_max, len(z))
    g = rng.standard_normal((n, len(sd))) * sd
    return normalize_rows(mean + g @ vt)


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------


@dataclass
class Choice:
    k: int
    scores: dict[int, float]
    structured: bool | None = None
    note: str = ""


Method = Callable[[Ctx, list[int], np.random.Generator], Choice]


def _argmax(scores: dict[int, float]) -> int:
    return max(scores, key=lambda k: (scores[k], -k))


# ------------------------------------------------------------------------------------------
# Silhouette family
# ------------------------------------------------------------------------------------------


def silhouette_k(ctx: Ctx, ks: list[int], rng: np.random.Generator, seed: int = 0,
                 sample: int = SIL_SAMPLE) -> Choice:
    """segd's current rule: the k with the largest silhouette (KMeans n_init 4)."""
    scores = {k: ctx.sil(k, seed, sample) for k in ks}
    return Choice(_argmax(scores), scores)


def silhouette_seeds(ctx: Ctx, ks: list[int], rng: np.random.Generator,
                     seeds: tuple[int, ...] = (0, 1, 2), sample: int = SIL_SAMPLE) -> Choice:
    """Mean silhouette over several KMeans / silhouette-sample seeds."""
    scores = {k: float(np.mean([ctx.sil(k, s, sample) for s in seeds])) for k in ks}
    return Choice(_argmax(scores), scores)


def silhouette_margin(ctx: Ctx, ks: list[int], rng: np.random.Generator,
                      tol: float = 0.01, seeds: tuple[int, ...] = (0, 1, 2),
                      se_mult: float = 0.0) -> Choice:
    """Largest k whose mean silhouette is within max(tol, se_mult * SE) of the best."""
    per = {k: np.asarray([ctx.sil(k, s) for s in seeds]) for k in ks}
    scores = {k: float(v.mean()) for k, v in per.items()}
    best = _argmax(scores)
    se = float(per[best].std(ddof=1) / np.sqrt(len(seeds))) if len(seeds) > 1 else 0.0
    band = max(tol, se_mult * se)
    k = max(kk for kk in ks if scores[kk] >= scores[best] - band)
    return Choice(k, scores, note=f"band {band:.4f}")


def null_silhouettes(ctx: Ctx, ks: list[int], draws: int, n_max: int = 0) -> np.ndarray:
    """(draws, len(ks)) silhouettes of the Gaussian reference, clustered the same way."""
    out = np.empty((draws, len(ks)))
    for d in range(draws):
        for j, k in enumerate(ks):
            key = (d, n_max, k)
            if key not in ctx._null_sil:
                zn = ctx.null_draw(d, n_max)
                ctx._null_sil[key] = silhouette(zn, kmeans(zn, k, d).labels_, d)
            out[d, j] = ctx._null_sil[key]
    return out


def silhouette_excess(ctx: Ctx, ks: list[int], rng: np.random.Generator, draws: int = 3,
                      z_min: float = 4.0, excess_min: float = 0.02, n_max: int = 0,
                      seeds: tuple[int, ...] = (0,), tol: float = 0.0) -> Choice:
    """Silhouette minus the silhouette the Gaussian reference gives at the same k.

    The reference (same size, mean and covariance, so the same PCA spectrum) has no clusters,
    yet its silhouette is highest at small k (KMeans splits it along its top axes), and that
    bias is what makes the plain silhouette pick too small a k. The chosen k maximises the
    excess (optionally: the largest k within `tol` of the best excess). Structured iff the
    excess at the chosen k is at least `excess_min` and `z_min` reference standard
    deviations.
    """
    null = null_silhouettes(ctx, ks, draws, n_max)
    mu, sd = null.mean(axis=0), null.std(axis=0, ddof=1) if draws > 1 else np.zeros(len(ks))
    obs = np.asarray([np.mean([ctx.sil(k, s) for s in seeds]) for k in ks])
    excess = obs - mu
    scores = {k: float(e) for k, e in zip(ks, excess, strict=True)}
    best = _argmax(scores)
    k = max(kk for kk in ks if scores[kk] >= scores[best] - tol) if tol > 0 else best
    j = ks.index(k)
    zscore = float(excess[j] / max(sd[j], 1e-3))
    structured = bool(excess[j] >= excess_min and zscore >= z_min)
    return Choice(k if structured else 1, scores, structured,
                  note=f"excess {excess[j]:.3f} z {zscore:.1f}")


def silhouette_with_null_test(ctx: Ctx, ks: list[int], rng: np.random.Generator,
                              base: Method, draws: int = 3, z_min: float = 4.0,
                              excess_min: float = 0.02) -> Choice:
    """Any k rule, plus the no-structure test on the silhouette at the k it chose."""
    ch = base(ctx, ks, rng)
    null = null_silhouettes(ctx, [ch.k], draws)[:, 0]
    excess = ctx.sil(ch.k) - null.mean()
    z = excess / max(null.std(ddof=1), 1e-3)
    structured = bool(excess >= excess_min and z >= z_min)
    return Choice(ch.k if structured else 1, ch.scores, structured,
                  note=f"excess {excess:.3f} z {z:.1f}")


# ------------------------------------------------------------------------------------------
# Other internal indices
# ------------------------------------------------------------------------------------------


def calinski_harabasz(ctx: Ctx, ks: list[int], rng: np.random.Generator) -> Choice:
    scores = {k: float(calinski_harabasz_score(ctx.z, ctx.labels(k))) for k in ks}
    return Choice(_argmax(scores), scores)


def davies_bouldin(ctx: Ctx, ks: list[int], rng: np.random.Generator) -> Choice:
    scores = {k: -float(davies_bouldin_score(ctx.z, ctx.labels(k))) for k in ks}
    return Choice(_argmax(scores), scores)


def mixture_bic(ctx: Ctx, ks: list[int], rng: np.random.Generator,
                covariance: str = "tied") -> Choice:
    """A Gaussian mixture (one covariance shared by the components: "tied") fitted for
    k = 1 and every k; the k with the lowest BIC (k = 1: no structure). The study's synthetic
    mixtures are of exactly this family."""
    z = np.asarray(ctx.z, dtype=np.float64)
    bic = {k: float(GaussianMixture(k, covariance_type=covariance, n_init=2, random_state=0,
                                    reg_covar=1e-5).fit(z).bic(z)) for k in [1, *ks]}
    k = min(bic, key=lambda kk: (bic[kk], kk))
    return Choice(k, {kk: -v for kk, v in bic.items() if kk > 1}, structured=k > 1)


def gap_statistic(ctx: Ctx, ks: list[int], rng: np.random.Generator, refs: int = 5,
                  reference: str = "gaussian") -> Choice:
    """Tibshirani, Walther & Hastie (2001): smallest k with Gap(k) >= Gap(k+1) - s(k+1),
    k = 1 included (k = 1 means no structure). Reference: uniform in the PCA-aligned box
    ("box", the paper's) or the Gaussian reference ("gaussian")."""
    z = ctx.z.astype(np.float64)
    grid = [1, *ks]

    def log_w(x: np.ndarray, k: int, seed: int) -> float:
        if k == 1:
            return float(np.log(((x - x.mean(axis=0)) ** 2).sum()))
        return float(np.log(kmeans(x.astype(np.float32), k, seed).inertia_))

    obs = np.asarray([
        float(np.log(((z - z.mean(axis=0)) ** 2).sum())) if k == 1 else
        float(np.log(ctx.fit(k).inertia_)) for k in grid])
    ref = np.empty((refs, len(grid)))
    if reference == "box":
        mean = z.mean(axis=0)
        _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
        zp = (z - mean) @ vt.T
        lo, hi = zp.min(axis=0), zp.max(axis=0)
    for b in range(refs):
        if reference == "box":
            xb = rng.uniform(lo, hi, size=zp.shape) @ vt + mean
        else:
            xb = ctx.null_draw(b).astype(np.float64)
        for j, k in enumerate(grid):
            ref[b, j] = log_w(xb, k, b)
    gap = ref.mean(axis=0) - obs
    s = ref.std(axis=0) * np.sqrt(1 + 1 / refs)
    scores = {k: float(g) for k, g in zip(grid, gap, strict=True)}
    for j in range(len(grid) - 1):
        if gap[j] >= gap[j + 1] - s[j + 1]:
            k = grid[j]
            return Choice(k, scores, structured=k > 1)
    return Choice(grid[-1], scores, structured=True)


# ------------------------------------------------------------------------------------------
# Resampling: prediction strength, Ben-Hur stability
# ------------------------------------------------------------------------------------------


def _co_membership_strength(test_labels: np.ndarray, pred: np.ndarray, how: str) -> float:
    per: list[float] = []
    for c in np.unique(test_labels):
        members = pred[test_labels == c]
        m = len(members)
        if m < 2:
            continue
        counts = np.bincount(members)
        same = float((counts * (counts - 1)).sum())
        per.append(same / (m * (m - 1)))
    if not per:
        return 0.0
    return float(min(per)) if how == "min" else float(np.mean(per))


def prediction_strength(ctx: Ctx, ks: list[int], rng: np.random.Generator, splits: int = 4,
                        threshold: float = 0.8, how: str = "min") -> Choice:
    """Tibshirani & Walther (2005): cluster two halves; the strength of k is how often pairs
    co-clustered in the test half are put together by the training half's centroids (the
    worst test cluster: how = "min", as in the paper, or their mean). The largest k whose
    mean strength over `splits` random halvings reaches `threshold`; 1 if none."""
    z = ctx.z
    n = len(z)
    ps = {k: [] for k in ks}
    for s in range(splits):
        perm = rng.permutation(n)
        a, b = perm[: n // 2], perm[n // 2:]
        for k in ks:
            if k >= len(a):
                ps[k].append(0.0)
                continue
            test = kmeans(z[a], k, s).labels_
            pred = kmeans(z[b], k, s).predict(z[a])
            ps[k].append(_co_membership_strength(test, pred, how))
    scores = {k: float(np.mean(v)) for k, v in ps.items()}
    ok = [k for k in ks if scores[k] >= threshold]
    k = max(ok) if ok else 1
    return Choice(k, scores, structured=bool(ok))


def stability(ctx: Ctx, ks: list[int], rng: np.random.Generator, pairs: int = 4,
              frac: float = 0.8, threshold: float = 0.0) -> Choice:
    """Ben-Hur, Elisseeff & Guyon (2002): cluster two random 80 % subsamples, compare the two
    labellings on their overlap (ARI). threshold 0: the most stable k; else the largest k
    whose mean ARI reaches it."""
    z = ctx.z
    n = len(z)
    m = max(int(frac * n), 2)
    st = {k: [] for k in ks}
    for p in range(pairs):
        i1 = rng.choice(n, m, replace=False)
        i2 = rng.choice(n, m, replace=False)
        both = np.intersect1d(i1, i2)
        for k in ks:
            if k >= m:
                st[k].append(0.0)
                continue
            l1 = kmeans(z[i1], k, 2 * p).predict(z[both])
            l2 = kmeans(z[i2], k, 2 * p + 1).predict(z[both])
            st[k].append(adjusted_rand_score(l1, l2))
    scores = {k: float(np.mean(v)) for k, v in st.items()}
    if threshold <= 0:
        return Choice(_argmax(scores), scores)
    ok = [k for k in ks if scores[k] >= threshold]
    return Choice(max(ok) if ok else min(ks), scores)


def clusterwise_jaccard(ctx: Ctx, ks: list[int], subsamples: int = 8,
                        frac: float = 0.8) -> dict[int, float]:
    """Hennig (2007), clusterwise stability: cluster `subsamples` random 80 % subsamples and,
    for every cluster of the whole set's clustering, take the Jaccard index of its members
    in the subsample with the most similar subsample cluster; per k, the least stable
    cluster's mean over the subsamples (memoised: the rules below share it)."""
    key = ("clusterwise jaccard", tuple(ks), subsamples, frac)
    if key in ctx.memo:
        return ctx.memo[key]  # type: ignore[return-value]
    z = ctx.z
    n = len(z)
    m = max(int(frac * n), 2)
    rng = np.random.default_rng(0)
    scores: dict[int, float] = {}
    for k in ks:
        full = ctx.labels(k)
        per = np.zeros(k)
        for b in range(subsamples):
            idx = rng.choice(n, m, replace=False)
            sub = kmeans(z[idx], k, 1 + b).labels_ if k < m else np.zeros(m, int)
            whole = full[idx]
            # joint[c, d]: members of whole cluster c in subsample cluster d.
            joint = np.zeros((k, k))
            np.add.at(joint, (whole, sub), 1)
            union = joint.sum(axis=1, keepdims=True) + joint.sum(axis=0, keepdims=True) - joint
            per += (joint / np.maximum(union, 1)).max(axis=1) / subsamples
        scores[k] = float(per.min())
    ctx.memo[key] = scores
    return scores


def jaccard_with_angular_test(ctx: Ctx, ks: list[int], rng: np.random.Generator,
                              threshold: float = 0.75, excess_min: float = 0.02,
                              draws: int = 3) -> Choice:
    """The largest k whose least stable cluster's Jaccard reaches `threshold` (none: the
    silhouette's k), then segd's no-structure test at that k (silhouette minus the angular
    central Gaussian's)."""
    scores = clusterwise_jaccard(ctx, ks)
    passing = [k for k in ks if scores[k] >= threshold]
    k = max(passing) if passing else silhouette_k(ctx, ks, rng).k
    ref = 0.0
    for d in range(draws):
        zr = angular_reference(ctx.z, np.random.default_rng(2000 + d), len(ctx.z))
        ref += silhouette(zr, kmeans(zr, k, d).labels_, d) / draws
    excess = ctx.sil(k) - ref
    structured = excess >= excess_min
    return Choice(k if structured else 1, scores, structured,
                  note=f"jaccard {scores[k]:.2f}, excess {excess:.3f}")


def excess_with_stability(ctx: Ctx, ks: list[int], rng: np.random.Generator,
                          stab_min: float = 0.6, **kw: object) -> Choice:
    """Null-calibrated silhouette, restricted to ks whose Ben-Hur stability >= stab_min."""
    ex = silhouette_excess(ctx, ks, rng, **kw)  # type: ignore[arg-type]
    if not ex.structured:
        return ex
    st = stability(ctx, ks, rng)
    ok = [k for k in ks if st.scores[k] >= stab_min] or ks
    k = max(ok, key=lambda kk: (ex.scores[kk], -kk))
    return Choice(k, ex.scores, True, note=ex.note)


def strength_then_score(ctx: Ctx, ks: list[int], rng: np.random.Generator,
                        threshold: float = 0.8, how: str = "mean", splits: int = 4,
                        score: str = "excess", excess_min: float = 0.02,
                        draws: int = 3) -> Choice:
    """Prediction strength as a filter, a silhouette as the choice: among the ks whose mean
    prediction strength reaches `threshold`, the one with the best score ("excess": the
    null-calibrated silhouette, "sil": the plain one). Structured iff some k passes and (for
    "excess") its excess reaches `excess_min`."""
    ps = prediction_strength(ctx, ks, rng, splits=splits, threshold=threshold, how=how)
    ok = [k for k in ks if ps.scores[k] >= threshold]
    if score == "excess":
        ex = silhouette_excess(ctx, ks, rng, draws=draws, z_min=0.0, excess_min=excess_min)
        sc = ex.scores
    else:
        sc = {k: ctx.sil(k) for k in ks}
    if not ok:
        return Choice(1, sc, False, note="no k passes the strength filter")
    k = max(ok, key=lambda kk: (sc[kk], -kk))
    structured = score != "excess" or sc[k] >= excess_min
    return Choice(k if structured else 1, sc, structured,
                  note=f"ps-feasible {ok}; score {sc[k]:.3f}")


# ------------------------------------------------------------------------------------------
# A small-n variant of prediction strength
# ------------------------------------------------------------------------------------------


def _pair_agreement(test: np.ndarray, predicted: np.ndarray) -> float:
    return _co_membership_strength(test, predicted, "mean")


def bootstrap_strength(z: np.ndarray, ks: list[int], rng: np.random.Generator, *,
                       resamples: int = 16, n_init: int = N_INIT,
                       seed: int = 0) -> dict[int, float]:
    """Prediction strength with the halves replaced by the whole set and bootstrap samples:
    the test clusters are KMeans(k) of all of z, the training clusters KMeans(k) of a sample
    of n rows drawn with replacement; the same pair agreement, averaged over resamples."""
    n = len(z)
    tests = {k: KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(z)
             for k in ks}
    out = {k: 0.0 for k in ks}
    for r in range(resamples):
        b = rng.choice(n, n, replace=True)
        for k in ks:
            if k >= len(np.unique(b)):
                continue
            train = KMeans(n_clusters=k, n_init=n_init, random_state=seed + r).fit(z[b])
            out[k] += _pair_agreement(tests[k], train.predict(z)) / resamples
    return out


def bootstrap_choice(z: np.ndarray, ks: list[int], seed: int = 0,
                     threshold: float = 0.8) -> KChoice:
    """The largest k whose `bootstrap_strength` reaches `threshold` (the strongest if none);
    always structured (there is no no-structure test this small)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    ks = sorted(k for k in set(ks) if 2 <= k < len(z))
    scores = bootstrap_strength(z, ks, np.random.default_rng(seed), seed=seed)
    passing = [k for k in ks if scores[k] >= threshold]
    k = max(passing) if passing else max(ks, key=lambda kk: (scores[kk], -kk))
    sil = silhouette(z, kmeans(z, k, seed).labels_, seed)
    return KChoice(k=k, scores=scores, method="bootstrap strength", runner_up=None,
                   margin=None, silhouette=sil, excess=None, structured=True)
