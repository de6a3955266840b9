"""Choose the number of clusters k: the silhouette on small sets, prediction strength above.

The rows `z` are the points clustering runs on (segd: the PCA projection of the
L2-normalised embeddings, re-normalised; a random subset of at most
`cluster.SELECTION_SAMPLE`). `decide` is the rule, a pure function of the rows' figures
(`Figures`); core.kfigures computes them (`choose_k` = the two together). The rules and
their settings come from the k study (bench/bench_k.py, docs/quality.md "Choosing k across
collections"), which chose them by their worst and mean results over 83 labelled
collections and five seeds; bench/bench_k_grid.py replays 5,265 variants of the decision
on stored figures, and none does better (finding 15).

rule "strength" (the default)
    Below `small_below` (64) rows, the silhouette rule below: prediction strength is
    unreliable on halves of 10-30 points (it calls real sets of 24-32 photos one
    cluster). From `small_below` rows up:

    1. Prediction strength (Tibshirani & Walther 2005): take at most `strength_rows` rows,
       split them at random into halves A and B and fit KMeans(k) on each; for every
       cluster of A, the fraction of its pairs of points that B's centroids also put
       together; strength(k) = the smallest of those fractions over A's clusters (the
       paper's definition, `aggregate` "min"), averaged over `splits` halvings. (fpc's
       prediction.strength also scores B against A's centroids and takes the mean of the
       two; `both_ways`. Over ten seeds it passed fewer k tests and its lowest ratio of
       mean ARIs was lower: docs/quality.md, finding 14.) k = the
       largest k whose strength reaches `threshold` (0.6: the paper's 0.8-0.9 is too harsh
       for overlapping photo classes). The minimum sees the one cluster a k too large cuts
       in two; the mean over clusters ("mean", segd's rule before) hardly moves then, and
       needed the step down below. Every KMeans here has `n_init` restarts (10): with 4,
       the k chosen moved with the seed (over 5 seeds and 83 collections, 61-66 right
       against 65-66).
    2. No-structure test, at the k the choice would report (the strength's, or the step
       up's, 3): the silhouette at k minus the mean silhouette, at the same k, of
       `null_draws` samples of unstructured data like z (at most `null_rows` rows), the
       excess, must reach `excess_min` (0.03), or the gap must reach `gap_min` (0.1): the
       references' mean log KMeans inertia per row at k minus the rows'. It is checked
       from `test_min_rows`, 150, rows up: on fewer the reference's silhouette is too
       noisy, and no rows are called unstructured. The reference
       ("angular") is the angular central Gaussian fitted to z (Tyler's estimator): the
       directions of one centred Gaussian, which is what one blob of embeddings becomes
       after segd's centring, projection and re-normalisation. (A Gaussian with z's own
       mean and covariance, re-normalised, "gaussian", is right only for a round blob: an
       elongated one re-normalises into two caps, which that reference lacks, and passed
       the test.) On the study's collections of >= 150 rows (seeds 0 and 1000) unstructured
       sets give an excess of up to 0.025 and a gap of up to 0.047; structured ones an
       excess of 0.039 or more, but for overlapping synthetic clusters (down to -0.021 over
       five seeds), whose gap is 0.19. Neither figure alone separates the two kinds; the
       pair does, at every seed of five (each threshold rests on one collection, though:
       docs/quality.md, finding 9). If both fall short, the rows have no cluster
       structure: k = 1, `structured` False. If no k reaches the threshold, the test is run
       on the silhouette's choice instead (clean groups more numerous than k_max look
       irreproducible at every k) and decides between that choice and k = 1 (below
       `test_min_rows` that choice stands).
    3. Step up: both figures lean to small k. The strength does where halves are too
       small to reproduce a cluster (64-150 photos, two close classes) and where the rows
       have more groups than the largest k tried (16 or 20 kinds of photo, k_max 10: pairs
       of groups merge differently in each half); the silhouette does everywhere. So the
       larger of the two choices is taken: when a larger k's silhouette beats the
       strength's k's by more than `step_up` (0.01), k = the larger k with the best
       silhouette. (clothing10 + scenes6, 16 classes: 7 -> 10; five clothing classes of 20
       photos: 3 -> 5. Five real classes of 16 photos, where the strength reproduces only
       2: the silhouette's 7-10, as below 64 rows. With the step up at 0.03, the rule of
       the study's fifth round, the strength started at 100 rows for that set's sake.)
       The no-structure test judges that k: at the strength's small k, 20 clean groups
       look hardly more compact than a blob cut in two.
    4. Step down: on small clean clusters (halves of 20-30 points each) a cluster cut in two
       can still reach the threshold (5 blobs of 40-60 points, 4 restarts: k = 6 at
       0.64-0.70; in the study, from 0.60-0.80). While k - 1 also reaches the threshold,
       k's strength is under `step_down_below` (0.85, the middle of the paper's 0.8-0.9)
       and k - 1's silhouette is higher than k's by more than `step_down`, k = k - 1.
       (Overlapping classes have flat silhouettes and keep k; splitting a clean cluster
       costs 0.05-0.3.) A k the halves reproduce by the paper's standard is not a cluster
       cut in two, whatever the silhouette, biased to small k, prefers: from any strength
       the step down merged four clusters in two pairs into 2 (strength at 4: 0.97-1.0),
       and took a five-cluster synthetic set from 4 (strength 0.87) to 2 at two seeds of
       five.

rule "silhouette"
    The k with the largest silhouette (segd's rule before the study). Biased to small k: it
    merges close classes, and it never finds "no structure".

Between the KMeans runs `checkpoint()` is called, so that a caller can abandon a choice (it
raises) without waiting for the whole of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from segd.config import KRule
from segd.core.kfigures import (
    Checkpoint,
    FigureSettings,
    Fit,
    LiveFigures,
    Reference,
)

__all__ = ["Figures", "KChoice", "KSelect", "choose_k", "decide"]


@dataclass(frozen=True)
class KSelect:
    """How to choose k; the defaults are the study's."""

    rule: KRule = "strength"
    seed: int = 0
    n_init: int = 10
    silhouette_sample: int = 4000  # rows the silhouette is computed on (it is O(n^2))
    minibatch_above: int = 20_000  # MiniBatchKMeans beyond this many rows
    small_below: int = 64  # rule "strength": the silhouette decides below this many rows
    # Over a split's clusters: the least reproducible one ("min") or their mean.
    aggregate: Literal["min", "mean"] = "min"
    # Score each halving both ways, A against B's centroids and B against A's (as fpc does).
    both_ways: bool = False
    threshold: float = 0.6
    splits: int = 8
    strength_rows: int = 4000
    # "angular" for centred rows (segd's projection), "gaussian" for raw embeddings.
    reference: Literal["angular", "gaussian"] = "angular"
    null_draws: int = 3
    null_rows: int = 4000
    excess_min: float = 0.03
    # Also structured when the gap (the references' mean log KMeans inertia at k minus the
    # rows') reaches this; None: the silhouette's excess alone decides (segd's rule before).
    gap_min: float | None = 0.1
    # Step down from the strength's k while the next smaller k passes too and its silhouette
    # is higher by more than this (None: off)...
    step_down: float | None = 0.05
    # ... and k's strength is under this: a k reproducible by the paper's standard (0.8-0.9)
    # is not a clean cluster cut in two.
    step_down_below: float = 0.85
    # Step up to a larger k whose silhouette is higher by more than this (None: off).
    step_up: float | None = 0.01
    # The reference silhouette is too noisy on fewer rows: below, no row set is called
    # unstructured, and with no reproducible k the silhouette's k stands.
    test_min_rows: int = 150

    @property
    def figures(self) -> FigureSettings:
        """The settings the figures depend on; the others only decide from them."""
        return FigureSettings(**{f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(FigureSettings)})


@dataclass(frozen=True)
class KChoice:
    k: int
    """The chosen k; 1 when the rows have no cluster structure."""
    scores: dict[int, float]
    """The deciding rule's figure for each k tried: prediction strength (0..1) or silhouette."""
    method: str
    """The rule that decided: "strength" or "silhouette"."""
    runner_up: int | None
    """The k the choice moves to first if the scores move: for k > 1, the alternative whose
    boundary is nearest (1 = no structure); for k = 1, the k the scores favoured. None when
    there was no alternative (a single candidate)."""
    margin: float | None
    """How far the deciding figure is from that move (>= 0, in its units). Silhouette: the
    best minus the runner-up's. Strength, k > 1: the smaller of strength(k) minus the
    threshold and the threshold minus the strength of the strongest larger k; after a step
    down, silhouette(k) - silhouette(k + 1) - `step_down` (runner_up k + 1); after a step
    up, silhouette(k) - silhouette(strength's k) - `step_up` (runner_up the strength's k),
    and `method` "silhouette". k = 1: the
    threshold minus the strongest k's strength, or `excess_min` minus the excess when the
    no-structure test rejected the strength's k (the gap fell short too: `gap`). None when
    runner_up is None."""
    silhouette: float | None
    """Silhouette of the rows at k (None when k = 1)."""
    excess: float | None
    """Silhouette at the k tested (the strength's k before any step down, or the step up's)
    minus the unstructured reference's (None: not run)."""
    structured: bool
    gap: float | None = None
    """The references' mean log KMeans inertia per row at that k minus the rows' (None:
    not needed, the excess decided alone, or not run)."""


class Figures(Protocol):
    """What a choice of k is decided from, each figure asked for only when the rule needs it
    (kfigures.LiveFigures computes them; a study may replay stored ones)."""

    def strengths(self) -> dict[int, float]: ...

    def fit(self, k: int) -> Fit: ...

    def reference(self, k: int) -> Reference: ...


def choose_k(z: np.ndarray, ks: list[int], settings: KSelect = KSelect(),
             checkpoint: Checkpoint | None = None) -> KChoice:
    """Choose k among `ks` (each clipped to 2..n-1) for the rows of z (n, p)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    ks = sorted(k for k in set(ks) if 2 <= k < len(z))
    if not ks:
        raise ValueError(f"no k in 2..{len(z) - 1} to choose from")
    figures = LiveFigures(z, ks, settings.figures, checkpoint)
    return decide(len(z), ks, settings, figures)


def decide(n: int, ks: list[int], settings: KSelect, figures: Figures) -> KChoice:
    """The choice for n rows among `ks` (sorted, each in 2..n-1), from their `figures`."""
    if settings.rule == "silhouette" or n < settings.small_below:
        return _by_silhouette(ks, figures)
    return _by_strength(n, ks, settings, figures)


def _by_silhouette(ks: list[int], f: Figures) -> KChoice:
    scores = {k: f.fit(k).silhouette for k in ks}
    order = sorted(ks, key=lambda kk: (-scores[kk], kk))  # ties: the smaller k
    k = order[0]
    runner_up = order[1] if len(order) > 1 else None
    margin = scores[k] - scores[runner_up] if runner_up is not None else None
    return KChoice(k=k, scores=scores, method="silhouette", runner_up=runner_up,
                   margin=margin, silhouette=scores[k], excess=None, structured=True)


def _by_strength(n: int, ks: list[int], s: KSelect, f: Figures) -> KChoice:
    scores = f.strengths()
    passing = [k for k in ks if scores[k] >= s.threshold]
    if not passing:
        # No k is reproducible enough. Unstructured rows look like that, and so do clearly
        # clustered rows with more groups than k_max (pairs of groups merge differently in
        # each half): the no-structure test on the silhouette's choice tells them apart.
        best = max(ks, key=lambda kk: (scores[kk], -kk))
        fallback = _by_silhouette(ks, f)
        if n < s.test_min_rows:  # untested rows keep the silhouette's
            return fallback
        test = _judge(f.reference(fallback.k), s)
        if test.passed:
            return dataclasses.replace(fallback, excess=test.excess, gap=test.gap)
        return KChoice(k=1, scores=scores, method="strength", runner_up=best,
                       margin=s.threshold - scores[best], silhouette=None,
                       excess=test.excess, structured=False, gap=test.gap)
    k = max(passing)
    runner_up, margin = _strength_boundary(scores, ks, passing, s.threshold)

    up = None  # the step up's k
    if s.step_up is not None:
        best_up = max((kk for kk in ks if kk > k),
                      key=lambda kk: (f.fit(kk).silhouette, -kk), default=None)
        if best_up is not None and f.fit(best_up).silhouette > f.fit(k).silhouette + s.step_up:
            up = best_up
    # The test judges the k the choice would report: at a step up that is the silhouette's
    # (20 clean groups, k_max 10: only k = 2 is reproducible, and two halves of 20 groups
    # are hardly more compact than two halves of a blob).
    tested = k if up is None else up
    excess = gap = None
    if n >= s.test_min_rows:
        test = _judge(f.reference(tested), s)
        excess, gap = test.excess, test.gap
        if not test.passed:
            return KChoice(k=1, scores=scores, method="strength", runner_up=tested,
                           margin=s.excess_min - test.excess, silhouette=None,
                           excess=excess, structured=False, gap=gap)
    if up is not None:
        # The silhouette decided: its figures are the ones the choice stands on.
        sils = {kk: f.fit(kk).silhouette for kk in ks}
        return KChoice(k=up, scores=sils, method="silhouette", runner_up=k,
                       margin=sils[up] - sils[k] - s.step_up, silhouette=sils[up],
                       excess=excess, structured=True, gap=gap)
    if s.step_down is not None:
        top = k
        while k - 1 in passing and scores[k] < s.step_down_below:
            if not f.fit(k - 1).silhouette > f.fit(k).silhouette + s.step_down:
                break
            k -= 1
        if k < top:
            runner_up = k + 1
            margin = f.fit(k).silhouette - f.fit(k + 1).silhouette - s.step_down
    return KChoice(k=k, scores=scores, method="strength", runner_up=runner_up, margin=margin,
                   silhouette=f.fit(k).silhouette, excess=excess, structured=True, gap=gap)


@dataclass(frozen=True)
class _Verdict:
    passed: bool
    excess: float
    gap: float | None  # None: the excess passed alone, or the gap is off


def _judge(ref: Reference, s: KSelect) -> _Verdict:
    """The no-structure test: the silhouette's excess over the references', then (if that
    falls short) the gap in log inertia."""
    if ref.excess >= s.excess_min or s.gap_min is None:
        return _Verdict(ref.excess >= s.excess_min, ref.excess, None)
    return _Verdict(ref.gap >= s.gap_min, ref.excess, ref.gap)


def _strength_boundary(scores: dict[int, float], ks: list[int], passing: list[int],
                       threshold: float) -> tuple[int, float]:
    """(runner_up, margin) for k = max(passing): the choice moves down when k's strength
    falls below the threshold (to the next passing k, or to 1), up when a larger k's rises."""
    k = max(passing)
    below = [kk for kk in passing if kk < k]
    runner_up, margin = (max(below) if below else 1), scores[k] - threshold
    larger = [kk for kk in ks if kk > k]
    if larger:
        up = max(larger, key=lambda kk: (scores[kk], kk))
        if threshold - scores[up] < margin:
            runner_up, margin = up, threshold - scores[up]
    return runner_up, margin
