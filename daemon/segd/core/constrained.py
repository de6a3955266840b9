"""KMeans where some rows keep their cluster: Lloyd iterations with those rows held in place.

Spherical KMeans (rows and centroids L2-normalised, nearest by cosine), started from given
centroids (the live clustering's, or a new fit's), with `fixed[i] >= 0` meaning row i stays
in cluster `fixed[i]` whatever is nearest (COP-KMeans' hard assignment, for must-stay rows
only). A held row still counts towards its cluster's centroid, so a photo a user filed by
hand pulls that cluster towards it: its look-alikes follow it there at the next assignment.

Rows come in chunks (`segd.core.cluster.ChunkSource`) so that a refit over a large library
never holds more than one chunk and the (k, d) sums; each iteration is one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from segd.core.cluster import ChunkSource, FitCancelled, normalize_rows

FREE = -1  # the value of `fixed` for a row the iterations may move


@dataclass(frozen=True)
class ConstrainedFit:
    labels: np.ndarray  # (n,) cluster index of each row; == fixed where fixed >= 0
    distances: np.ndarray  # (n,) cosine distance of each row to its own cluster's centroid
    centroids: np.ndarray  # (k, d) L2-normalised; an emptied cluster keeps its start
    iterations: int  # centroid updates made (each followed by an assignment pass)
    converged: bool  # the last update changed no row's cluster


def constrained_kmeans(x: np.ndarray, init: np.ndarray, fixed: np.ndarray, *,
                       max_iter: int = 20) -> ConstrainedFit:
    """In-memory form of `constrained_kmeans_stream`."""
    return constrained_kmeans_stream(lambda: (x,), len(x), init, fixed, max_iter=max_iter)


def constrained_kmeans_stream(read_chunks: ChunkSource, n: int, init: np.ndarray,
                              fixed: np.ndarray, *, max_iter: int = 20,
                              should_stop: Callable[[], bool] | None = None) -> ConstrainedFit:
    """Lloyd iterations from `init` (k, d) over n rows, rows with `fixed >= 0` held there.

    Each pass assigns every free row to its nearest centroid, keeps every held row where it
    is, and makes each centroid the normalised mean of its members (a cluster left with no
    members keeps its centroid: it may be a user's, or wait for members). Stops when a pass
    moves no free row, or after `max_iter` updates. `max_iter=0` only assigns.
    """
    k = len(init)
    fixed = np.asarray(fixed, dtype=np.int64)
    if fixed.shape != (n,):
        raise ValueError(f"fixed has shape {fixed.shape}, expected ({n},)")
    if k == 0:
        raise ValueError("no centroids to start from")
    if fixed.max(initial=FREE) >= k or fixed.min(initial=FREE) < FREE:
        raise ValueError(f"fixed holds a cluster index outside 0..{k - 1}")
    centroids = normalize_rows(np.asarray(init, dtype=np.float32))
    labels, distances = _assign(read_chunks, n, centroids, fixed, should_stop)
    iterations, converged = 0, False
    while iterations < max_iter:
        centroids = _means(read_chunks, labels, centroids, should_stop)
        new, distances = _assign(read_chunks, n, centroids, fixed, should_stop)
        iterations += 1
        converged = bool(np.array_equal(new, labels))
        labels = new
        if converged:
            break
    return ConstrainedFit(labels=labels, distances=distances, centroids=centroids,
                          iterations=iterations, converged=converged)


def _check(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise FitCancelled


def _assign(read_chunks: ChunkSource, n: int, centroids: np.ndarray, fixed: np.ndarray,
            should_stop: Callable[[], bool] | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, cosine distance of each row to its own centroid), in one pass."""
    labels = np.empty(n, dtype=np.int64)
    distances = np.empty(n, dtype=np.float32)
    start = 0
    for chunk in read_chunks():
        _check(should_stop)
        stop = start + len(chunk)
        if stop > n:
            raise ValueError(f"the chunk source gave more than {n} rows")
        sims = np.asarray(chunk, dtype=np.float32) @ centroids.T
        held = fixed[start:stop]
        own = np.where(held >= 0, held, np.argmax(sims, axis=1))
        labels[start:stop] = own
        distances[start:stop] = np.clip(1.0 - sims[np.arange(len(own)), own], 0.0, 2.0)
        start = stop
    if start != n:
        raise ValueError(f"the chunk source gave {start} rows, expected {n}")
    return labels, distances


def _means(read_chunks: ChunkSource, labels: np.ndarray, previous: np.ndarray,
           should_stop: Callable[[], bool] | None) -> np.ndarray:
    k = len(previous)
    sums = np.zeros((k, previous.shape[1]), dtype=np.float64)
    start = 0
    for chunk in read_chunks():
        _check(should_stop)
        part = labels[start:start + len(chunk)]
        onehot = (part[:, None] == np.arange(k)).astype(np.float64)
        sums += onehot.T @ np.asarray(chunk, dtype=np.float64)
        start += len(chunk)
    empty = ~np.any(sums != 0.0, axis=1)
    sums[empty] = previous[empty]
    return normalize_rows(sums).astype(np.float32)
