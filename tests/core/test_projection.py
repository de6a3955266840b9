"""segd's projection (core.cluster) against scikit-learn's PCA (full SVD) as the reference.

Both routes: fewer rows than dimensions (the Gram matrix's eigenvectors) and more (the
covariance's). Components agree up to sign, so they are compared row by row as |cosine|,
and projected rows after aligning each column's sign.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from segd.core import cluster
from segd.core.cluster import FitParams


def sample(n: int, d: int, *, seed: int) -> np.ndarray:
    """Rows with a falling, distinct spectrum (no ties among the leading components)."""
    rng = np.random.default_rng(seed)
    axes, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (rng.standard_normal((n, d)) * np.linspace(3.0, 0.1, d)) @ axes.T + 0.5


@pytest.mark.parametrize("n, d", [(90, 200), (400, 120)], ids=["gram", "covariance"])
@pytest.mark.parametrize("whiten", [False, True])
def test_matches_sklearn_pca(n: int, d: int, whiten: bool) -> None:
    x = sample(n, d, seed=1)
    dims = 16
    ours = cluster._projection_of(x, FitParams(pca_dims=dims, whiten=whiten))
    ref = PCA(n_components=dims, svd_solver="full", whiten=whiten).fit(x)
    assert ours.components is not None and ours.mean is not None
    np.testing.assert_allclose(ours.mean, ref.mean_, atol=1e-6)
    comps = ours.components.astype(np.float64)
    if whiten:  # sklearn whitens the transform, segd the components: scale the same
        np.testing.assert_allclose(np.linalg.norm(comps, axis=1),
                                   1 / np.sqrt(ref.explained_variance_), rtol=1e-4)
    cosines = np.abs(np.sum(comps * ref.components_, axis=1)) / np.linalg.norm(comps, axis=1)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-5)

    projected = ours.apply(x.astype(np.float32))
    expected = ref.transform(x)
    expected *= np.sign(np.sum(comps * ref.components_, axis=1))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(projected, expected, atol=1e-4)


def test_duplicate_rows_leave_no_direction_without_variance_blown_up() -> None:
    """Ten rows, three distinct: dims is clipped to n - 1 = 9, of which only 2 carry
    variance. Those 2 are the reference's; the rest are zero, and every row projects to a
    finite unit vector."""
    base = sample(3, 200, seed=2)
    x = base[[0, 1, 2, 0, 1, 2, 0, 1, 2, 0]]
    ours = cluster._projection_of(x, FitParams(pca_dims=32))
    ref = PCA(n_components=2, svd_solver="full").fit(x)
    assert ours.components is not None
    comps = ours.components.astype(np.float64)
    assert comps.shape == (9, 200)
    np.testing.assert_allclose(np.abs(np.sum(comps[:2] * ref.components_, axis=1)), 1.0,
                               atol=1e-5)
    assert not comps[2:].any()
    projected = ours.apply(x.astype(np.float32))
    assert np.isfinite(projected).all()
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)
