"""When to refit, and whether a refit's answer replaces the live clustering or only updates it.

Pure decisions on plain values; the daemon (scheduling) and state.refit (applying) act on them.

Replace or update: a new fit replaces the live clusters only when the rule that chose its k
says, by a clear margin, that its k is better than the live k on the same data. Every
candidate k was scored on the current photos, so the live k's score is already there. Two
kinds of rule are understood:

- threshold rules (prediction strength): k is the largest k whose score reaches a threshold.
  The live k stands while its score stays within `hysteresis` below the threshold; a larger
  k takes over only once it clears the threshold by `hysteresis`;
- best-score rules (the silhouette): k is the best-scoring k; it takes over only when it
  beats the live k's score by `hysteresis`.

Otherwise (same k, no structure in the new data, or a k not clearly better) the live
clusters stay: their centroids follow their members and nobody's files move.

Scheduling: a growth refit waits for a burst to settle (the inbox quiet for `settle_s`), so a
burst is fitted once, when it is all in, not at every 25 % of it. The first fit needs
`min_images`, a settled inbox, and structure: when a fit finds none the photos wait, and the
next try comes after the collection grew by RETRY_GROWTH.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass

from segd.config import ClusteringConfig

# How far the live k's score may fall below a threshold rule's threshold, and how far above
# it a larger k must be, before a refit replaces the live clustering (strength is 0..1).
THRESHOLD_HYSTERESIS = 0.05
# How much better than the live k's silhouette a best-score rule's k must be.
SCORE_HYSTERESIS = 0.02
# After a fit found no structure, the next try waits for this much growth.
RETRY_GROWTH = 0.25
# A stream that never pauses does not hold a due refit back for longer than this.
MAX_SETTLE_WAIT_S = 600.0


class Action(enum.Enum):
    REPLACE = "replace"  # apply the new fit: new centroids, identities matched, files re-filed
    UPDATE = "update"  # keep the live clusters; their centroids follow their members
    WAIT = "wait"  # no clusters yet and no structure: the photos stay in the inbox


@dataclass(frozen=True)
class Verdict:
    """What a fit's k rule said about the current photos."""

    k: int  # its choice (1: no structure)
    structured: bool
    scores: Mapping[int, float]  # the rule's score of every k it tried
    threshold: float | None = None  # threshold rules: the score a k must reach; None: best score
    rule: str = "silhouette"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(verdict: Verdict, live_k: int, *, forced: bool = False,
           hysteresis: float | None = None) -> Decision:
    """Replace, update or wait, for a fit `verdict` and `live_k` clusters made by fits.

    `forced`: the user asked for this fit (a fixed k): it replaces whenever it has clusters.
    """
    if live_k == 0:
        if verdict.structured and verdict.k >= 1:
            return Decision(Action.REPLACE, "first fit")
        return Decision(Action.WAIT, f"no structure found ({verdict.rule})")
    if forced:
        return Decision(Action.REPLACE, f"k={verdict.k} asked for")
    if not verdict.structured:
        return Decision(Action.UPDATE, f"no structure found ({verdict.rule}); "
                                       f"the {live_k} clusters stay")
    if verdict.k == live_k:
        return Decision(Action.UPDATE, f"k={live_k} again")
    live = verdict.scores.get(live_k)
    new = verdict.scores.get(verdict.k)
    if live is None or new is None:
        return Decision(Action.REPLACE, f"k={live_k} was not a candidate")
    if verdict.threshold is None:
        h = SCORE_HYSTERESIS if hysteresis is None else hysteresis
        if new >= live + h:
            return Decision(Action.REPLACE, f"k={verdict.k} scores {new:.3f}, "
                                            f"k={live_k} {live:.3f}")
        return Decision(Action.UPDATE, f"k={verdict.k} ({new:.3f}) not clearly better than "
                                       f"k={live_k} ({live:.3f})")
    h = THRESHOLD_HYSTERESIS if hysteresis is None else hysteresis
    t = verdict.threshold
    if verdict.k > live_k:
        if new >= t + h:
            return Decision(Action.REPLACE, f"k={verdict.k} clears {t:.2f} ({new:.3f})")
        return Decision(Action.UPDATE, f"k={verdict.k} only just clears {t:.2f} ({new:.3f}); "
                                       f"k={live_k} stays ({live:.3f})")
    if live < t - h:
        return Decision(Action.REPLACE, f"k={live_k} no longer holds ({live:.3f} < {t:.2f})")
    return Decision(Action.UPDATE, f"k={live_k} still holds ({live:.3f}, threshold {t:.2f})")


@dataclass(frozen=True)
class Schedule:
    """What the daemon knows when it asks whether a refit is due."""

    n: int  # images with embeddings (sorted and pending)
    live_k: int  # active clusters
    last_fit_n: int = 0  # n at the last applied fit (0: none yet)
    since_fit_s: float = 0.0  # seconds since the last applied fit
    unstructured_n: int = 0  # n at the last fit that found no structure and waited (0: none)
    idle_s: float = 0.0  # seconds since the inbox was last busy (0 while it is)
    busy_s: float = 0.0  # seconds it has been busy without a pause (0 while idle)


def refit_due(s: Schedule, c: ClusteringConfig) -> str | None:
    """The trigger of a refit due now, or None."""
    if s.live_k == 0:
        if s.n < c.min_images:
            return None
        if s.unstructured_n and s.n < s.unstructured_n * (1 + RETRY_GROWTH):
            return None
        return "first fit" if settled(s, c) else None
    if c.refit_growth > 0 and s.last_fit_n and s.n >= s.last_fit_n * (1 + c.refit_growth):
        return f"grew from {s.last_fit_n} to {s.n} images" if settled(s, c) else None
    if c.refit_interval_s > 0 and s.since_fit_s >= c.refit_interval_s:
        return "interval" if settled(s, c) else None
    return None


def settled(s: Schedule, c: ClusteringConfig) -> bool:
    """The inbox has been quiet for settle_s, or busy for too long to keep waiting."""
    return s.idle_s >= c.settle_s or s.busy_s >= MAX_SETTLE_WAIT_S


def next_try_at(unstructured_n: int) -> int:
    """The collection size at which a first fit that found no structure is tried again."""
    return math.ceil(unstructured_n * (1 + RETRY_GROWTH))
