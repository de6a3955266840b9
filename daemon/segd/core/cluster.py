"""Clustering core: project, choose k (core.kselect), fit KMeans, assign, match identities.

Pure numpy / scikit-learn; no files, no store. Embeddings arrive L2-normalised (n, d) float32.

Why a projection: KMeans and the silhouette are both distance-based, and in 1280 dimensions
most of the distance is noise shared by every image. Centring, keeping the leading principal
components and re-normalising concentrates the distances on what separates images
(docs/quality.md has the figures), and makes a refit over a million embeddings cheap:
clustering runs on (n, pca_dims) instead of (n, 1280).

Large collections are streamed: `fit_stream` takes a callable that yields the embeddings in
chunks, in the same order each time, and never holds more than the projected matrix. Above
LARGE_FIT_ABOVE rows the clustering is decided on a random sample of the rows (projection,
k, KMeans, and the centroids as the sample's means in the original space) and applied to
every row in one pass: the rows are read once, besides the sample, and nothing of size
n x d is ever held (docs/scale.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from segd.config import ClusteringConfig, KRule
from segd.core import kmeans_large, kselect

ChunkSource = Callable[[], Iterable[np.ndarray]]
# The rows at given ascending global positions, as (m, d): how a large fit reads its sample
# without a pass over the rows (a store reads them by id).
RowTaker = Callable[[np.ndarray], np.ndarray]

# k is chosen on a random subset of at most this many rows: the rules only need a few
# thousand points, and KMeans on a subset of this size finds the same structure.
SELECTION_SAMPLE = 20_000
# Rows used to estimate the principal components.
PCA_SAMPLE = 20_000
# Above LARGE_FIT_ABOVE rows: the rows the clustering is decided on, as one sample (the PCA's,
# the k selection's and the KMeans'); held as (FIT_SAMPLE, d) float32 while it is fitted.
FIT_SAMPLE = 20_000
# Rows of the sample a large fit's covariance is summed over at a time (float64 blocks).
_COVARIANCE_BLOCK = 2048


@dataclass(frozen=True)
class FitParams:
    k: int | str = "auto"  # "auto" or a fixed number of clusters
    k_rule: KRule = "strength"  # how "auto" chooses (core.kselect); pca_dims 0: silhouette
    k_min: int = 2
    k_max: int = 10
    random_state: int = 0
    n_init: int = 10
    silhouette_sample: int = 4000
    minibatch_above: int = 20_000
    pca_dims: int = 32  # 0 = raw embeddings; keep it >= about 2 * k_max (docs/quality.md)
    whiten: bool = False

    @classmethod
    def from_config(cls, c: ClusteringConfig) -> FitParams:
        return cls(k=c.k, k_rule=c.k_rule, k_min=c.k_min, k_max=c.k_max,
                   random_state=c.random_state, n_init=c.n_init,
                   silhouette_sample=c.silhouette_sample, minibatch_above=c.minibatch_above,
                   pca_dims=c.pca_dims)


@dataclass(frozen=True)
class Projection:
    """Centre, rotate onto the leading components, re-normalise. Identity when dims == 0."""

    mean: np.ndarray | None = None  # (d,)
    components: np.ndarray | None = None  # (p, d), rows scaled for whitening when asked

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.components is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        y = (x - self.mean) @ self.components.T
        return normalize_rows(y.astype(np.float32, copy=False))


@dataclass
class FitResult:
    k: int
    labels: np.ndarray  # (n,) int, in the order the rows were given
    distances: np.ndarray  # (n,) cosine distance of each row to its centroid
    centroids: np.ndarray  # (k, d) L2-normalised, in the original embedding space
    # The choosing rule's figure for each k tried (prediction strength or silhouette).
    scores: dict[int, float] = field(default_factory=dict)
    silhouette: float | None = None  # at the chosen k (None when k < 2)
    duration_s: float = 0.0
    rule: str = "fixed"  # what chose k: "strength", "silhouette", or "fixed" (not chosen)
    runner_up: int | None = None  # see kselect.KChoice
    margin: float | None = None
    # False: k = "auto" found no cluster structure, and k is 1.
    structured: bool = True
    # Seconds per step of a large fit (sample, projection, k, kmeans, pass), for benchmarks.
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def candidate_ks(n: int, params: FitParams) -> list[int]:
    """The k values k = "auto" chooses from: [k_min, k_max] clipped to n - 1."""
    if params.k != "auto":
        return [min(int(params.k), n)]
    hi = min(params.k_max, n - 1)
    return list(range(min(params.k_min, hi), hi + 1)) if hi >= 2 else []


def fit(x: np.ndarray, params: FitParams) -> FitResult:
    """Fit an in-memory matrix of embeddings (see `fit_stream` for the streamed form)."""
    return fit_stream(lambda: (x,), len(x), params)


class FitCancelled(Exception):
    """`should_stop` said so between two steps of a fit."""


def fit_stream(read_chunks: ChunkSource, n: int, params: FitParams,
               should_stop: Callable[[], bool] | None = None,
               take: RowTaker | None = None) -> FitResult:
    """Cluster n embeddings read in chunks; `read_chunks()` must give the same rows each call.

    Above LARGE_FIT_ABOVE rows, `read_chunks()` is called once (see the module doc), and
    `take`, when given, reads the sample (else one more pass over the chunks gathers it).
    `should_stop` is polled between chunks and between KMeans runs, so a stopping daemon
    waits for one step of a fit, not the whole fit; it then raises FitCancelled.
    """
    if should_stop is not None:
        read_chunks = _stoppable(read_chunks, should_stop)
    stop = should_stop or (lambda: False)
    # One BLAS thread: the matrices here are small enough that threads mostly contend, and a
    # fit runs beside decoding and inference (7-14x faster under load, docs/benchmarks.md).
    with threadpool_limits(limits=1):
        if n > LARGE_FIT_ABOVE:
            return _fit_sampled(read_chunks, n, params, stop,
                                take or (lambda rows: _gather_rows(read_chunks, rows, np.float32)))
        return _fit_stream(read_chunks, n, params, stop)


def _stoppable(read_chunks: ChunkSource, should_stop: Callable[[], bool]) -> ChunkSource:
    def chunks() -> Iterator[np.ndarray]:
        for chunk in read_chunks():
            if should_stop():
                raise FitCancelled
            yield chunk
    return chunks


def _fit_stream(read_chunks: ChunkSource, n: int, params: FitParams,
                should_stop: Callable[[], bool]) -> FitResult:
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to cluster, got {n}")
    started = time.perf_counter()
    rng = np.random.default_rng(params.random_state)

    projection = _fit_projection(read_chunks, n, params, rng)
    z = np.concatenate([projection.apply(c) for c in read_chunks()])  # (n, p) float32
    if len(z) != n:
        raise ValueError(f"the chunk source gave {len(z)} rows, expected {n}")

    k, choice = _choose_k(lambda: z[_subset(rng, n, SELECTION_SAMPLE)], n, params,
                          should_stop)

    if should_stop():
        raise FitCancelled
    model = _final_fit(z, k, params)
    # Centroids live in the original space so that online assignment needs no projection;
    # a last pass re-labels every row against them, so the batch result and later
    # nearest-centroid assignments agree exactly.
    centroids = _centroids_in_original_space(read_chunks, model.labels_, k)
    labels, distances = _assign_stream(read_chunks, centroids)
    silhouette = choice.silhouette if choice is not None else None
    if silhouette is None and 2 <= k < n:
        silhouette = _silhouette(z[_subset(rng, n, SELECTION_SAMPLE)],
                                 None, params, model=model)
    if choice is None:
        return FitResult(k=k, labels=labels, distances=distances, centroids=centroids,
                         silhouette=silhouette, duration_s=time.perf_counter() - started)
    return FitResult(k=k, labels=labels, distances=distances, centroids=centroids,
                     scores=choice.scores, silhouette=silhouette,
                     duration_s=time.perf_counter() - started, rule=choice.method,
                     runner_up=choice.runner_up, margin=choice.margin,
                     structured=choice.structured)


def _fit_sampled(read_chunks: ChunkSource, n: int, params: FitParams,
                 should_stop: Callable[[], bool], take: RowTaker) -> FitResult:
    """The large fit: decided on FIT_SAMPLE random rows, applied to all n in one pass."""
    if n < 2:
        raise ValueError(f"need at least 2 embeddings to cluster, got {n}")
    started = time.perf_counter()
    phases = _Phases()
    rng = np.random.default_rng(params.random_state)
    rows = np.sort(_subset(rng, n, FIT_SAMPLE))
    x = np.ascontiguousarray(take(rows), dtype=np.float32)
    if len(x) != len(rows):
        raise ValueError(f"the row source gave {len(x)} sample rows, expected {len(rows)}")
    phases.end("sample")
    projection = _sample_projection(x, params)
    # In blocks: no second (FIT_SAMPLE, d) temporary beside the sample.
    z = np.concatenate([projection.apply(block) for block in chunked(x, _COVARIANCE_BLOCK)])
    phases.end("projection")
    k, choice = _choose_k(lambda: z, n, params, should_stop)
    phases.end("k")
    if should_stop():
        raise FitCancelled
    model = kmeans_large.fit_large(z, k, seed=params.random_state, n_init=params.n_init)
    phases.end("kmeans")
    # The sample's means in the original space are the centroids, so that the one pass's
    # nearest-centroid labels and distances are final: each row's label is its nearest
    # centroid, as online assignment later finds it.
    sums = _cluster_sums(x, model.labels_, k)
    del x
    centroids = normalize_rows(sums).astype(np.float32)
    labels, distances = _assign_stream(read_chunks, centroids)
    if len(labels) != n:
        raise ValueError(f"the chunk source gave {len(labels)} rows, expected {n}")
    phases.end("pass")
    silhouette = choice.silhouette if choice is not None else None
    if silhouette is None and 2 <= k < n:
        silhouette = _silhouette(z, model.labels_, params)
    return FitResult(k=k, labels=labels, distances=distances, centroids=centroids,
                     scores=choice.scores if choice else {}, silhouette=silhouette,
                     duration_s=time.perf_counter() - started,
                     rule=choice.method if choice else "fixed",
                     runner_up=choice.runner_up if choice else None,
                     margin=choice.margin if choice else None,
                     structured=choice.structured if choice else True,
                     phases=phases.seconds)


class _Phases:
    """Seconds since the previous step ended, by step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def end(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


def _sample_projection(x: np.ndarray, params: FitParams) -> Projection:
    """The projection of a large fit, from its float32 sample: the covariance is summed in
    float64 blocks, so no float64 copy of the sample is made."""
    if params.pca_dims <= 0:
        return Projection()
    dims = min(params.pca_dims, x.shape[1], max(len(x) - 1, 1))
    if len(x) < x.shape[1]:
        return _projection_of(np.asarray(x, dtype=np.float64), params)
    mean = x.mean(axis=0, dtype=np.float64)
    d = x.shape[1]
    cov = np.zeros((d, d), dtype=np.float64)
    for block in chunked(x, _COVARIANCE_BLOCK):
        # Each block's product in float32 (half the time), summed in float64.
        centred = (block - mean).astype(np.float32)
        cov += centred.T @ centred
    cov /= max(len(x) - 1, 1)
    return _top_components(cov, mean, dims, params)


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    for i in range(0, len(x), _COVARIANCE_BLOCK):
        onehot = (labels[i:i + _COVARIANCE_BLOCK, None] == np.arange(k)).astype(np.float64)
        sums += onehot.T @ np.asarray(x[i:i + _COVARIANCE_BLOCK], dtype=np.float64)
    return sums


def _choose_k(rows: Callable[[], np.ndarray], n: int, params: FitParams,
              should_stop: Callable[[], bool]) -> tuple[int, kselect.KChoice | None]:
    """k and how it was chosen (None: given, not chosen); `rows` is called only when k is
    chosen (the rows to choose on: the projected subset)."""
    ks = candidate_ks(n, params)
    if params.k != "auto" or not ks:
        return (ks[0] if ks else 1), None

    def checkpoint() -> None:
        if should_stop():
            raise FitCancelled

    choice = kselect.choose_k(rows(), ks, _kselect_settings(params), checkpoint)
    return choice.k, choice


def _kselect_settings(params: FitParams) -> kselect.KSelect:
    # The strength rule was chosen on the projection; on raw embeddings (pca_dims 0) it
    # splits clean clusters (KMeans on a few dozen points in 1280-d reproduces any split),
    # so the silhouette decides there.
    rule = params.k_rule if params.pca_dims > 0 else "silhouette"
    return kselect.KSelect(rule=rule, seed=params.random_state, n_init=params.n_init,
                           silhouette_sample=params.silhouette_sample,
                           minibatch_above=params.minibatch_above)


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine distance (rows and centroids L2-normalised)."""
    sims = x @ centroids.T
    labels = np.argmax(sims, axis=1)
    best = sims[np.arange(len(x)), labels]
    return labels, np.clip(1.0 - best, 0.0, 2.0).astype(np.float32)


def match_clusters(old: np.ndarray, new: np.ndarray, max_distance: float) -> dict[int, int]:
    """Map new cluster index -> old cluster index by optimal one-to-one matching.

    Pairs further apart than `max_distance` (cosine) are not matched: such a new cluster
    is genuinely new, and an old cluster left unmatched is retired, never renumbered.
    """
    if len(old) == 0 or len(new) == 0:
        return {}
    cost = 1.0 - new @ old.T
    rows, cols = linear_sum_assignment(cost)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True)
            if cost[r, c] <= max_distance}


def _fit_projection(read_chunks: ChunkSource, n: int, params: FitParams,
                    rng: np.random.Generator) -> Projection:
    if params.pca_dims <= 0:
        return Projection()
    take = np.sort(_subset(rng, n, PCA_SAMPLE))
    return _projection_of(_gather_rows(read_chunks, take), params)


def _projection_of(sample: np.ndarray, params: FitParams) -> Projection:
    """The projection estimated on a float64 sample (n, d)."""
    dims = min(params.pca_dims, sample.shape[1], max(len(sample) - 1, 1))
    mean = sample.mean(axis=0)
    centred = sample - mean
    scale = max(len(sample) - 1, 1)
    if len(sample) < sample.shape[1]:
        return _top_components_by_gram(centred, mean, dims, params)
    return _top_components(centred.T @ centred / scale, mean, dims, params)


def _top_components_by_gram(centred: np.ndarray, mean: np.ndarray, dims: int,
                            params: FitParams) -> Projection:
    """Fewer rows than dimensions: the top eigenvectors u of the (n, n) Gram matrix give the
    components centred' u / sqrt(eigenvalue), the same as the sample's thin SVD, four
    times faster (949 photos x 1280)."""
    n = len(centred)
    values, vectors = scipy.linalg.eigh(centred @ centred.T,
                                        subset_by_index=[n - dims, n - 1], driver="evr")
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    # A direction without variance (duplicate rows) has no component: a zero row, where
    # dividing by its eigenvalue would blow rounding noise up.
    kept = values > values[0] * 1e-10
    components = np.zeros((dims, centred.shape[1]))
    components[kept] = (centred.T @ (vectors[:, kept] / np.sqrt(values[kept]))).T
    return _projection(mean, components, values / max(n - 1, 1), params)


def _top_components(cov: np.ndarray, mean: np.ndarray, dims: int,
                    params: FitParams) -> Projection:
    """The top eigenvectors of the (d, d) covariance, and only those: ten times faster than
    an SVD of the sample."""
    d = cov.shape[0]
    values, vectors = scipy.linalg.eigh(cov, subset_by_index=[d - dims, d - 1], driver="evr")
    order = np.argsort(values)[::-1]
    return _projection(mean, vectors[:, order].T, values[order], params)


def _projection(mean: np.ndarray, components: np.ndarray, eigvals: np.ndarray,
                params: FitParams) -> Projection:
    """Components (p, d) with their variances, scaled to unit variance when whitening (a
    zero component stays zero)."""
    if params.whiten:
        components = components / np.sqrt(np.maximum(eigvals, 1e-12))[:, None]
    return Projection(mean=mean.astype(np.float32), components=components.astype(np.float32))


def _gather_rows(read_chunks: ChunkSource, rows: np.ndarray,
                 dtype: type[np.floating] = np.float64) -> np.ndarray:
    """Rows at the given sorted global indices, read in one streaming pass."""
    parts, start = [], 0
    for chunk in read_chunks():
        stop = start + len(chunk)
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            parts.append(np.asarray(chunk[rows[lo:hi] - start], dtype=dtype))
        start = stop
    return np.concatenate(parts)


def _subset(rng: np.random.Generator, n: int, limit: int) -> np.ndarray:
    return np.arange(n) if n <= limit else rng.choice(n, size=limit, replace=False)


def _kmeans(k: int, n: int, params: FitParams) -> KMeans | MiniBatchKMeans:
    if n > params.minibatch_above:
        return MiniBatchKMeans(n_clusters=k, random_state=params.random_state,
                               n_init=params.n_init, batch_size=4096)
    return KMeans(n_clusters=k, random_state=params.random_state, n_init=params.n_init)


def _silhouette(z: np.ndarray, labels: np.ndarray | None, params: FitParams,
                model: KMeans | MiniBatchKMeans | None = None) -> float:
    if labels is None:
        assert model is not None
        labels = model.predict(z)
    if len(np.unique(labels)) < 2:
        return -1.0
    sample = min(params.silhouette_sample, len(z))
    return float(silhouette_score(z, labels, sample_size=sample,
                                  random_state=params.random_state))


def _centroids_in_original_space(read_chunks: ChunkSource, labels: np.ndarray,
                                 k: int) -> np.ndarray:
    sums: np.ndarray | None = None
    start = 0
    for chunk in read_chunks():
        part = labels[start:start + len(chunk)]
        if sums is None:
            sums = np.zeros((k, chunk.shape[1]), dtype=np.float64)
        onehot = (part[:, None] == np.arange(k)).astype(np.float64)
        sums += onehot.T @ np.asarray(chunk, dtype=np.float64)
        start += len(chunk)
    assert sums is not None
    return normalize_rows(sums).astype(np.float32)


def _assign_stream(read_chunks: ChunkSource,
                   centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, distances = [], []
    for chunk in read_chunks():
        lab, dist = assign(np.asarray(chunk, dtype=np.float32), centroids)
        labels.append(lab)
        distances.append(dist)
    return np.concatenate(labels), np.concatenate(distances)


def chunked(x: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), rows):
        yield x[i:i + rows]


# ---- The final fit over every row, below LARGE_FIT_ABOVE rows.

# Above this many rows a fit is decided on a sample and applied in one pass (`_fit_sampled`;
# its KMeans is core.kmeans_large's subset-then-refine fit). At and below it, every row is
# projected and clustered, and read again for the centroids and the assignment.
LARGE_FIT_ABOVE = 100_000


def _final_fit(z: np.ndarray, k: int, params: FitParams) -> KMeans | MiniBatchKMeans:
    return _kmeans(k, len(z), params).fit(z)
