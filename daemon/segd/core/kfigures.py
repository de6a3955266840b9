"""The figures k is chosen from (core.kselect decides): prediction strength, KMeans fits and
the no-structure test's unstructured references, each computed once, when first asked for.

Pure numpy / scikit-learn. What each figure means, and why the rule wants it, is in
core.kselect's docstring; here is only how it is computed. `LiveFigures` keeps what it has
computed in a `Known`, plain values, so that a study can store them and replay other rules
on them without a KMeans.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import silhouette_score

__all__ = ["Checkpoint", "FigureSettings", "Fit", "Known", "LiveFigures", "Reference",
           "angular_reference", "gaussian_reference", "prediction_strength"]

Checkpoint = Callable[[], None]


@dataclass(frozen=True)
class FigureSettings:
    """The settings the figures depend on (kselect.KSelect has the same fields, and
    `KSelect.figures` picks them out): two rules with equal FigureSettings see the same
    figures and differ only in how they decide."""

    seed: int
    n_init: int  # KMeans restarts, everywhere
    silhouette_sample: int  # rows the silhouette is computed on (it is O(n^2))
    minibatch_above: int  # MiniBatchKMeans for fits on more rows than this
    aggregate: Literal["min", "mean"]  # over a halving's clusters
    both_ways: bool  # score each halving A -> B and B -> A
    splits: int  # halvings
    strength_rows: int  # the strength is computed on a random subset of at most this many
    reference: Literal["angular", "gaussian"]
    null_draws: int  # unstructured references per k tested
    null_rows: int  # rows of each reference


@dataclass(frozen=True)
class Fit:
    """KMeans(k) on the rows: the silhouette of its labels and its inertia per row."""

    silhouette: float
    inertia: float


@dataclass(frozen=True)
class Reference:
    """The rows' fit at k against `null_draws` unstructured references like them, fitted at
    the same k."""

    excess: float
    """The rows' silhouette minus the references' mean silhouette."""
    gap: float
    """The references' mean log inertia per row minus the rows'."""


@dataclass
class Known:
    """The figures computed so far for one set of rows, ks and FigureSettings."""

    strengths: dict[int, float] | None = None
    after_strength: dict[str, Any] | None = None
    """The generator's state once the strength has drawn its subset and halvings: the
    references' draws go on from there (as segd's choice always drew them)."""
    fits: dict[int, Fit] = field(default_factory=dict)
    references: dict[int, Reference] = field(default_factory=dict)


class LiveFigures:
    """The figures of the rows z (n, p) over ks, computed on demand and kept in `known`
    (pass a `Known` to go on from figures computed before). `checkpoint` is called before
    every KMeans, so that a caller can abandon a choice (it raises)."""

    def __init__(self, z: np.ndarray, ks: list[int], settings: FigureSettings,
                 checkpoint: Checkpoint | None = None, known: Known | None = None) -> None:
        self.z = z
        self.ks = ks
        self.settings = settings
        self.known = Known() if known is None else known
        self._check = checkpoint or (lambda: None)

    def strengths(self) -> dict[int, float]:
        """Prediction strength at each k, over `splits` halvings of at most
        `strength_rows` rows."""
        known, s = self.known, self.settings
        if known.strengths is None:
            rng = np.random.default_rng(s.seed)
            n = len(self.z)
            zs = self.z if n <= s.strength_rows else self.z[
                rng.choice(n, s.strength_rows, replace=False)]
            known.strengths = prediction_strength(
                zs, self.ks, rng, splits=s.splits, n_init=s.n_init, seed=s.seed,
                aggregate=s.aggregate, both_ways=s.both_ways, checkpoint=self._check)
            known.after_strength = rng.bit_generator.state
        return known.strengths

    def fit(self, k: int) -> Fit:
        """KMeans(k) on all the rows (`n_init` restarts, seed `seed`)."""
        if k not in self.known.fits:
            self._check()
            s = self.settings
            model = _kmeans(k, len(self.z), s, s.seed).fit(self.z)
            self.known.fits[k] = Fit(_silhouette(self.z, model.labels_, s, s.seed),
                                     float(model.inertia_) / len(self.z))
        return self.known.fits[k]

    def reference(self, k: int) -> Reference:
        """The rows' fit at k against `null_draws` unstructured references; whichever k is
        asked first, the draws start where the strength left the generator."""
        if k not in self.known.references:
            self.strengths()
            rng = np.random.default_rng()
            rng.bit_generator.state = self.known.after_strength
            self.known.references[k] = self._against_references(k, rng)
        return self.known.references[k]

    def _against_references(self, k: int, rng: np.random.Generator) -> Reference:
        s, z = self.settings, self.z
        draw = angular_reference if s.reference == "angular" else gaussian_reference
        silhouette = log_inertia = 0.0
        for d in range(s.null_draws):
            zr = draw(z, rng, min(len(z), s.null_rows))
            self._check()
            model = _kmeans(k, len(zr), s, s.seed + 1 + d).fit(zr)
            silhouette += _silhouette(zr, model.labels_, s, s.seed + 1 + d) / s.null_draws
            log_inertia += _log(model.inertia_ / len(zr)) / s.null_draws
        fit = self.fit(k)
        return Reference(excess=fit.silhouette - silhouette,
                         gap=log_inertia - _log(fit.inertia))


def prediction_strength(z: np.ndarray, ks: list[int], rng: np.random.Generator, *,
                        splits: int = 8, n_init: int = 10, seed: int = 0,
                        aggregate: Literal["min", "mean"] = "min", both_ways: bool = False,
                        checkpoint: Checkpoint | None = None) -> dict[int, float]:
    """Mean over `splits` random halvings A, B of the prediction strength: the smallest
    ("min") or the mean of the pair agreements of A's clusters with B's centroids; with
    `both_ways`, the mean of that and the same with the halves' roles swapped."""
    over = min if aggregate == "min" else statistics.fmean

    def strength_of(test: KMeans, train: KMeans, rows: np.ndarray) -> float:
        agreements = _pair_agreements(test.labels_, train.predict(rows))
        return over(agreements) if agreements else 0.0

    check = checkpoint or (lambda: None)
    n = len(z)
    out = {k: 0.0 for k in ks}
    for split in range(splits):
        perm = rng.permutation(n)
        a, b = z[perm[: n // 2]], z[perm[n // 2:]]
        for k in ks:
            if k >= len(a):
                continue
            check()
            on_a = KMeans(n_clusters=k, n_init=n_init, random_state=seed + split).fit(a)
            on_b = KMeans(n_clusters=k, n_init=n_init, random_state=seed + split).fit(b)
            score = strength_of(on_a, on_b, a)
            if both_ways:
                score = (score + strength_of(on_b, on_a, b)) / 2
            out[k] += score / splits
    return out


def angular_reference(z: np.ndarray, rng: np.random.Generator, rows: int) -> np.ndarray:
    """`rows` directions of a centred Gaussian whose directions match z's (the angular
    central Gaussian; its shape is Tyler's M-estimator). Falls back to
    `gaussian_reference` with too few rows for the estimator (n <= 2p)."""
    n, p = z.shape
    if n <= 2 * p:
        return gaussian_reference(z, rng, rows)
    shape = _tyler(np.asarray(z, dtype=np.float64))
    g = rng.standard_normal((rows, p)) @ np.linalg.cholesky(shape).T
    return (g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)).astype(
        np.float32)


def _tyler(z: np.ndarray, iterations: int = 100, tol: float = 1e-7) -> np.ndarray:
    """Tyler's M-estimator of shape (trace p): the fixed point of
    S = p/n sum z z' / (z' S^-1 z)."""
    p = z.shape[1]
    shape = np.eye(p)
    for _ in range(iterations):
        w = 1.0 / np.maximum(np.einsum("ij,ij->i", z @ np.linalg.inv(shape), z), 1e-12)
        new = (z * w[:, None]).T @ z
        new *= p / np.trace(new)
        done = np.abs(new - shape).max() < tol
        shape = new
        if done:
            break
    return shape


def gaussian_reference(z: np.ndarray, rng: np.random.Generator, rows: int) -> np.ndarray:
    """`rows` points of a Gaussian with z's mean and covariance, rows L2-normalised."""
    z64 = np.asarray(z, dtype=np.float64)
    mean = z64.mean(axis=0)
    _, sv, vt = np.linalg.svd(z64 - mean, full_matrices=False)
    sd = sv / np.sqrt(max(len(z) - 1, 1))
    ref = mean + (rng.standard_normal((rows, len(sd))) * sd) @ vt
    norms = np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    return (ref / norms).astype(np.float32)


def _pair_agreements(test: np.ndarray, predicted: np.ndarray) -> list[float]:
    """For each test cluster (of >= 2 points), the fraction of its pairs that `predicted`
    also puts in one cluster."""
    per: list[float] = []
    for c in np.unique(test):
        members = predicted[test == c]
        m = len(members)
        if m >= 2:
            counts = np.bincount(members)
            per.append(float((counts * (counts - 1)).sum()) / (m * (m - 1)))
    return per


def _log(x: float) -> float:
    return float(np.log(max(x, 1e-30)))


def _kmeans(k: int, n: int, s: FigureSettings, seed: int) -> KMeans | MiniBatchKMeans:
    if n > s.minibatch_above:
        return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=s.n_init,
                               batch_size=4096)
    return KMeans(n_clusters=k, random_state=seed, n_init=s.n_init)


def _silhouette(z: np.ndarray, labels: np.ndarray, s: FigureSettings, seed: int) -> float:
    if len(np.unique(labels)) < 2:
        return -1.0
    return float(silhouette_score(z, labels, sample_size=min(s.silhouette_sample, len(z)),
                                  random_state=seed))
