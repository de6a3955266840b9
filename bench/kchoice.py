"""Choose the number of clusters k by prediction strength, with a no-structure test.

Self-contained reference implementation (numpy, scikit-learn) of the rule the k study
(bench/bench_k.py, docs/quality.md "Choosing k across collections") found to generalise best,
written so that it can move into the package as it is. It is what the study's row
"choose_k (reference)" runs.

On the points `z` the clustering runs on (segd: the PCA-32 projection of the L2-normalised
embeddings, re-normalised; at most SELECTION_SAMPLE rows):

1. Prediction strength (Tibshirani & Walther 2005), averaged over clusters: take at most
   `ps_rows` rows, split them at random into two halves A and B, fit KMeans(k) on each; for
   every cluster of A, the fraction of its pairs of points that B's centroids also put
   together; strength(k) = the mean of those fractions over A's clusters (the paper takes the
   minimum, which is too harsh for overlapping photo classes), averaged over `splits` random
   halvings.
2. k = the largest k whose strength reaches `threshold` (0.8); the runner-up is the next
   largest k that reaches it (or, when only one does, the strongest of the others).
3. No-structure test: the silhouette at k must exceed the silhouette that unstructured data
   gives at the same k by `excess_min` (0.02). The reference is `null_draws` samples of a
   Gaussian with z's mean and covariance (the same PCA spectrum, hence the same elongation),
   re-normalised like z, at most `null_rows` rows, clustered the same way. Unstructured sets
   give an excess of 0.005-0.008; real photo collections of >= 100 photos >= 0.058. If no k reaches
   the strength threshold, or (with at least `test_min_rows` rows; the reference is too
   noisy below) the excess is below `excess_min`, the collection is `structured = False`
   (and k = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

__all__ = ["KChoice", "choose_k", "gaussian_reference", "prediction_strength"]


@dataclass(frozen=True)
class KChoice:
    k: int
    """The chosen k (1 when `structured` is False)."""
    scores: dict[int, float]
    """Prediction strength for each k tried (0..1)."""
    runner_up: int | None
    margin: float
    """Strength at k minus the threshold: how safely k passed (negative: nothing passed)."""
    silhouette: float
    """Silhouette of the data at k (at the strongest k when nothing passed)."""
    excess: float
    """That silhouette minus the unstructured reference's at the same k."""
    structured: bool
    labels: np.ndarray | None = field(default=None, repr=False)
    """KMeans labels of `z` at k (None when not structured)."""


def gaussian_reference(z: np.ndarray, rng: np.random.Generator, rows: int) -> np.ndarray:
    """`rows` points of a Gaussian with z's mean and covariance, rows L2-normalised."""
    z64 = np.asarray(z, dtype=np.float64)
    mean = z64.mean(axis=0)
    _, s, vt = np.linalg.svd(z64 - mean, full_matrices=False)
    sd = s / np.sqrt(max(len(z) - 1, 1))
    ref = mean + (rng.standard_normal((rows, len(sd))) * sd) @ vt
    return (ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)).astype(
        np.float32)


def _silhouette(z: np.ndarray, labels: np.ndarray, sample: int, seed: int) -> float:
    if len(np.unique(labels)) < 2:
        return -1.0
    return float(silhouette_score(z, labels, sample_size=min(sample, len(z)),
                                  random_state=seed))


def _pair_agreement(test: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over test clusters (of >= 2 points) of the fraction of their pairs that
    `predicted` also puts in one cluster."""
    per: list[float] = []
    for c in np.unique(test):
        members = predicted[test == c]
        m = len(members)
        if m >= 2:
            counts = np.bincount(members)
            per.append(float((counts * (counts - 1)).sum()) / (m * (m - 1)))
    return float(np.mean(per)) if per else 0.0


def prediction_strength(z: np.ndarray, ks: list[int], rng: np.random.Generator, *,
                        splits: int = 8, n_init: int = 4, seed: int = 0) -> dict[int, float]:
    n = len(z)
    out = {k: 0.0 for k in ks}
    for s in range(splits):
        perm = rng.permutation(n)
        a, b = z[perm[: n // 2]], z[perm[n // 2:]]
        for k in ks:
            if k >= len(a):
                continue
            test = KMeans(n_clusters=k, n_init=n_init, random_state=seed + s).fit_predict(a)
            train = KMeans(n_clusters=k, n_init=n_init, random_state=seed + s).fit(b)
            out[k] += _pair_agreement(test, train.predict(a)) / splits
    return out


def choose_k(z: np.ndarray, ks: list[int], rng_seed: int = 0, *, threshold: float = 0.8,
             splits: int = 8, ps_rows: int = 4000, n_init: int = 4,
             silhouette_sample: int = 4000, null_draws: int = 3, null_rows: int = 4000,
             excess_min: float = 0.02, test_min_rows: int = 100) -> KChoice:
    """Choose k in `ks` for the rows of `z` (n, p); see the module docstring."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    n = len(z)
    ks = sorted(k for k in set(ks) if 2 <= k < n)
    if not ks:
        raise ValueError(f"no k in 2..{n - 1} to choose from")
    rng = np.random.default_rng(rng_seed)
    zs = z if n <= ps_rows else z[rng.choice(n, ps_rows, replace=False)]
    scores = prediction_strength(zs, ks, rng, splits=splits, n_init=n_init, seed=rng_seed)

    passing = [k for k in ks if scores[k] >= threshold]
    if passing:
        k = max(passing)
        rest = [kk for kk in passing if kk != k]
        others = [kk for kk in ks if kk != k]
        runner_up = max(rest) if rest else (max(others, key=lambda kk: scores[kk])
                                            if others else None)
    else:
        k = max(ks, key=lambda kk: (scores[kk], -kk))
        runner_up = None
    margin = scores[k] - threshold

    labels = KMeans(n_clusters=k, n_init=n_init, random_state=rng_seed).fit_predict(z)
    sil = _silhouette(z, labels, silhouette_sample, rng_seed)
    ref = 0.0
    for d in range(null_draws):
        zr = gaussian_reference(z, rng, min(n, null_rows))
        lab = KMeans(n_clusters=k, n_init=n_init, random_state=rng_seed + 1 + d).fit_predict(zr)
        ref += _silhouette(zr, lab, silhouette_sample, rng_seed + 1 + d) / null_draws
    excess = sil - ref
    # Below test_min_rows the reference silhouette is too noisy (a real 32-photo, 4-class
    # set gave an excess under 0.02): only the strength filter decides there.
    structured = bool(passing) and (n < test_min_rows or excess >= excess_min)
    return KChoice(k=k if structured else 1, scores=scores, runner_up=runner_up,
                   margin=margin, silhouette=sil, excess=excess, structured=structured,
                   labels=labels if structured else None)
