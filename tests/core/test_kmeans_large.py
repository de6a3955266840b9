"""The subset-then-refine KMeans: found the blobs, agrees with sklearn, both backends alike.

Ten seeded Gaussian blobs in 32 dimensions (the projected space the final fit runs in);
sklearn's KMeans over every row and adjusted_rand_score are the independent references.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from segd.core import cluster, kmeans_large
from segd.core.cluster import FitParams, fit
from segd.core.kmeans_large import fit_large, nearest, refine

needs_faiss = pytest.mark.skipif(not kmeans_large.faiss_available(),
                                 reason="faiss is not installed (pip install 'segd[faiss]')")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread() -> Iterator[None]:
    with threadpool_limits(limits=1):  # results do not depend on it; contention does
        yield


def blobs(n: int = 60_000, k: int = 10, dim: int = 32, noise: float = 0.5,
          seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    x = centres[labels] + rng.standard_normal((n, dim)) * (noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def mixture() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, truth = blobs()
    reference = KMeans(n_clusters=10, n_init=4, random_state=0).fit_predict(x)
    return x, truth, reference


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=needs_faiss)])
def test_subset_then_refine_finds_the_blobs_and_agrees_with_sklearn(mixture, backend) -> None:
    x, truth, reference = mixture
    model = fit_large(x, 10, seed=0, subset_rows=5_000, backend=backend)
    assert model.backend == backend
    assert adjusted_rand_score(truth, model.labels_) == 1.0
    assert adjusted_rand_score(reference, model.labels_) == 1.0
    assert model.labels_.shape == (len(x),) and model.cluster_centers_.shape == (10, 32)
    # The labels are those of the returned centroids, as predict gives them.
    assert np.array_equal(model.predict(x), model.labels_)


@needs_faiss
def test_faiss_and_numpy_refine_to_the_same_labels() -> None:
    x, _ = blobs(n=30_000, k=40, noise=0.9, seed=5)  # overlapping: many points move
    start = x[np.random.default_rng(0).choice(len(x), 40, replace=False)]
    a = refine(x, start, backend="numpy", iters=50)
    b = refine(x, start, backend="faiss", iters=50)
    assert a.backend == "numpy" and b.backend == "faiss"
    assert a.n_iter_ > 2  # the refinement really iterated
    assert adjusted_rand_score(a.labels_, b.labels_) > 0.999
    assert b.inertia_ == pytest.approx(a.inertia_, rel=1e-4)


def test_refinement_improves_a_perturbed_start_to_sklearns_optimum(mixture) -> None:
    x, _, reference = mixture
    exact = KMeans(n_clusters=10, n_init=4, random_state=0).fit(x)
    rng = np.random.default_rng(1)
    start = (exact.cluster_centers_
             + rng.standard_normal(exact.cluster_centers_.shape) * 0.05).astype(np.float32)
    model = refine(x, start, backend="numpy")
    assert model.inertia_ < nearest(x, start)[1].sum() * 0.9
    assert adjusted_rand_score(reference, model.labels_) == 1.0
    assert model.inertia_ == pytest.approx(exact.inertia_, rel=1e-4)


def test_an_emptied_cluster_keeps_its_centre() -> None:
    x, _ = blobs(n=2_000, k=3)
    start = np.vstack([x[:3], np.full((1, 32), 50.0, dtype=np.float32)])  # nobody's nearest
    model = refine(x, start, backend="numpy")
    assert np.isfinite(model.cluster_centers_).all()
    assert np.array_equal(model.cluster_centers_[3], start[3])
    assert 3 not in model.labels_


def test_nearest_is_the_brute_force_nearest_centre() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1_000, 8)).astype(np.float32)
    c = rng.standard_normal((7, 8)).astype(np.float32)
    labels, d2 = nearest(x, c, chunk_rows=64)
    full = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
    assert np.array_equal(labels, full.argmin(axis=1))
    np.testing.assert_allclose(d2, full.min(axis=1), rtol=1e-4, atol=1e-5)


def test_asking_for_faiss_without_it_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setattr(kmeans_large, "import_faiss", lambda: None)
    x, _ = blobs(n=500, k=2)
    with pytest.raises(ImportError, match=r"segd\[faiss\]"):
        refine(x, x[:2], backend="faiss")
    assert refine(x, x[:2], backend="auto").backend == "numpy"


def test_the_final_fit_above_the_threshold_is_the_subset_then_refine_fit(monkeypatch) -> None:
    calls: list[int] = []
    real = kmeans_large.fit_large

    def spy(z: np.ndarray, k: int, **kw: object) -> kmeans_large.LargeFit:
        calls.append(len(z))
        return real(z, k, **kw)

    monkeypatch.setattr(kmeans_large, "fit_large", spy)
    x, truth = blobs(n=6_000, k=4, dim=64, noise=0.6)
    params = FitParams(k=4, pca_dims=16)
    fit(x, params)
    assert calls == []  # below LARGE_FIT_ABOVE: sklearn as before
    monkeypatch.setattr(cluster, "LARGE_FIT_ABOVE", 5_000)
    result = fit(x, params)
    assert calls == [6_000]
    assert adjusted_rand_score(truth, result.labels) == 1.0
    assert result.silhouette is not None  # the fixed-k silhouette predicts with the model
