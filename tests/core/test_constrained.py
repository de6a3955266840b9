"""KMeans with held rows: held rows never move, pull their cluster, and the stream agrees.

Blobs on the unit sphere as in test_cluster (random unit centres, isotropic noise); a
256-d space is enough for what these tests check and keeps each fit in milliseconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from segd.core.cluster import FitCancelled, chunked
from segd.core.constrained import FREE, constrained_kmeans, constrained_kmeans_stream

DIM = 256


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def blobs(centres: np.ndarray, per: int, noise: float, seed: int) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), per)
    x = centres[labels] + rng.standard_normal((len(labels), DIM)) * (noise / np.sqrt(DIM))
    order = rng.permutation(len(labels))
    return unit(x[order]), labels[order]


def centres(k: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((k, DIM)))


def test_free_rows_from_rough_starts_find_the_blobs() -> None:
    c = centres(4)
    x, truth = blobs(c, 50, noise=1.0, seed=1)
    rough = unit(c + np.random.default_rng(2).standard_normal(c.shape) * 0.05)
    got = constrained_kmeans(x, rough, np.full(len(x), FREE))
    assert got.converged and got.iterations <= 5
    assert adjusted_rand_score(truth, got.labels) == 1.0
    # Each centroid is its members' normalised mean, and each distance is to it.
    for j in range(4):
        mean = x[got.labels == j].sum(axis=0)
        assert np.allclose(got.centroids[j], mean / np.linalg.norm(mean), atol=1e-5)
    own = np.einsum("ij,ij->i", x, got.centroids[got.labels])
    assert np.allclose(got.distances, 1.0 - own, atol=1e-5)


def test_held_rows_keep_their_cluster_whatever_is_nearest() -> None:
    c = centres(3)
    x, truth = blobs(c, 40, noise=1.0, seed=3)
    fixed = np.full(len(x), FREE)
    # Three rows of blob 0 held in cluster 2 (a user filed them there) and one of blob 1
    # held in cluster 0: each is far from the cluster it is held in.
    held = {int(i): 2 for i in np.flatnonzero(truth == 0)[:3]}
    held[int(np.flatnonzero(truth == 1)[0])] = 0
    for i, j in held.items():
        fixed[i] = j
    got = constrained_kmeans(x, c, fixed)
    assert all(got.labels[i] == j for i, j in held.items())
    free = fixed == FREE
    assert adjusted_rand_score(truth[free], got.labels[free]) == 1.0


def test_held_rows_pull_their_cluster_and_their_look_alikes_follow() -> None:
    # Blob 1 is split from blob 0 only by the user: they made a cluster (2) and filed five
    # photos of blob 1 into it. Blob 1's other photos follow them there; blob 0 stays.
    c = centres(3, seed=4)
    c[1] = unit(c[0] + 0.9 * c[1])  # blob 1 lies next to blob 0
    x, truth = blobs(c[:2], 60, noise=0.8, seed=5)
    fixed = np.full(len(x), FREE)
    fixed[np.flatnonzero(truth == 1)[:5]] = 2
    # Start: one live cluster holding both blobs, one elsewhere, the user's at its five.
    start = np.stack([unit(c[0] + c[1]), c[2], unit(x[fixed == 2].mean(axis=0))])
    got = constrained_kmeans(x, start, fixed)
    assert got.converged
    assert np.mean(got.labels[truth == 1] == 2) >= 0.95
    assert np.mean(got.labels[truth == 0] == 0) >= 0.95

    # Without the pull (held rows kept but not counted in the centroid) the rest stay put.
    no_pull = constrained_kmeans(x, start, fixed, max_iter=0)
    assert np.mean(no_pull.labels[(truth == 1) & (fixed == FREE)] == 2) < 0.5


def test_an_emptied_cluster_keeps_its_centroid() -> None:
    c = centres(3, seed=6)
    x, _ = blobs(c[:2], 30, noise=1.0, seed=7)  # nothing near centre 2
    got = constrained_kmeans(x, c, np.full(len(x), FREE))
    assert not np.any(got.labels == 2)
    assert np.allclose(got.centroids[2], c[2])


def test_the_stream_gives_the_in_memory_result() -> None:
    c = centres(5, seed=8)
    x, truth = blobs(c, 37, noise=1.2, seed=9)
    fixed = np.full(len(x), FREE)
    fixed[::17] = truth[::17][::-1]  # some rows held, a few of them in another blob
    start = unit(c + np.random.default_rng(10).standard_normal(c.shape) * 0.1)
    whole = constrained_kmeans(x, start, fixed)
    streamed = constrained_kmeans_stream(lambda: chunked(x, 23), len(x), start, fixed)
    assert np.array_equal(whole.labels, streamed.labels)
    assert np.allclose(whole.centroids, streamed.centroids, atol=1e-6)
    assert whole.iterations == streamed.iterations


def test_bad_arguments_and_a_stop_request() -> None:
    c = centres(2)
    x, _ = blobs(c, 10, noise=1.0, seed=11)
    with pytest.raises(ValueError, match="shape"):
        constrained_kmeans(x, c, np.full(len(x) - 1, FREE))
    with pytest.raises(ValueError, match="outside"):
        constrained_kmeans(x, c, np.full(len(x), 2))
    with pytest.raises(ValueError, match="rows"):
        constrained_kmeans_stream(lambda: (x[:5],), len(x), c, np.full(len(x), FREE))
    with pytest.raises(FitCancelled):
        constrained_kmeans_stream(lambda: (x,), len(x), c, np.full(len(x), FREE),
                                  should_stop=lambda: True)
