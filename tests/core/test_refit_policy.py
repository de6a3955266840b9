"""The refit policy: replace only when the k rule clearly prefers the new k; refit a burst once."""

from __future__ import annotations

import dataclasses

import pytest

from segd.config import ClusteringConfig
from segd.core.refit_policy import (
    MAX_SETTLE_WAIT_S,
    RETRY_GROWTH,
    SCORE_HYSTERESIS,
    THRESHOLD_HYSTERESIS,
    Action,
    Schedule,
    Verdict,
    decide,
    next_try_at,
    refit_due,
)

# A threshold rule (prediction strength, threshold 0.8) and a best-score rule (silhouette).
STRENGTH = {2: 0.97, 3: 0.93, 4: 0.88, 5: 0.84, 6: 0.71, 7: 0.62}
SILHOUETTE = {2: 0.10, 3: 0.14, 4: 0.15, 5: 0.13}


def strength(k: int, scores: dict[int, float] | None = None, structured: bool = True) -> Verdict:
    return Verdict(k=k, structured=structured, scores=scores or STRENGTH, threshold=0.8,
                   rule="prediction strength")


def silhouette(k: int, scores: dict[int, float] | None = None) -> Verdict:
    return Verdict(k=k, structured=True, scores=scores or SILHOUETTE)


# --------------------------------------------------------------------------- replace or update


def test_the_first_fit_needs_structure() -> None:
    assert decide(strength(5), live_k=0).action is Action.REPLACE
    waits = decide(strength(1, structured=False), live_k=0)
    assert waits.action is Action.WAIT and "no structure" in waits.reason


def test_the_same_k_or_no_structure_only_updates() -> None:
    assert decide(strength(5), live_k=5).action is Action.UPDATE
    assert decide(silhouette(4), live_k=4).action is Action.UPDATE
    gone = decide(strength(1, structured=False), live_k=5)
    assert gone.action is Action.UPDATE and "no structure" in gone.reason


def test_a_threshold_rule_replaces_only_past_the_hysteresis() -> None:
    # Growing: k=5 clears 0.8 by 0.04 < 0.05: the live 4 stays; by 0.06 it takes over.
    assert decide(strength(5), live_k=4).action is Action.UPDATE
    clear = {**STRENGTH, 5: 0.8 + THRESHOLD_HYSTERESIS + 0.01}
    assert decide(strength(5, clear), live_k=4).action is Action.REPLACE
    # Shrinking: the live 6 scores 0.71, below 0.8 - 0.05: it no longer holds.
    assert decide(strength(5), live_k=6).action is Action.REPLACE
    # The live 6 just under the threshold (0.77) still holds.
    near = {**STRENGTH, 6: 0.77}
    assert decide(strength(5, near), live_k=6).action is Action.UPDATE


def test_a_best_score_rule_replaces_only_when_clearly_better() -> None:
    # 4 beats 3 by 0.01 < 0.02: keep 3. Beats 2 by 0.05: replace 2.
    assert decide(silhouette(4), live_k=3).action is Action.UPDATE
    assert decide(silhouette(4), live_k=2).action is Action.REPLACE
    assert decide(silhouette(4), live_k=3, hysteresis=0.005).action is Action.REPLACE
    assert SCORE_HYSTERESIS == 0.02


def test_a_live_k_the_rule_did_not_try_is_replaced() -> None:
    assert decide(strength(5), live_k=12).action is Action.REPLACE


def test_a_k_the_user_asked_for_always_replaces() -> None:
    assert decide(strength(5), live_k=5, forced=True).action is Action.REPLACE
    assert decide(silhouette(4), live_k=3, forced=True).action is Action.REPLACE


# --------------------------------------------------------------------------- scheduling


CONFIG = ClusteringConfig(min_images=20, refit_growth=0.25, settle_s=10.0,
                          refit_interval_s=3600.0)


def test_the_first_fit_waits_for_min_images_and_a_settled_inbox() -> None:
    assert refit_due(Schedule(n=19, live_k=0, idle_s=60), CONFIG) is None
    assert refit_due(Schedule(n=32, live_k=0, idle_s=2), CONFIG) is None  # mid-burst
    assert refit_due(Schedule(n=600, live_k=0, idle_s=10), CONFIG) == "first fit"


def test_after_no_structure_the_first_fit_waits_for_growth() -> None:
    waiting = Schedule(n=32, live_k=0, unstructured_n=32, idle_s=60)
    assert refit_due(waiting, CONFIG) is None
    again = next_try_at(32)
    assert again == 40 and again >= 32 * (1 + RETRY_GROWTH)
    assert refit_due(dataclasses.replace(waiting, n=again - 1), CONFIG) is None
    assert refit_due(dataclasses.replace(waiting, n=again), CONFIG) == "first fit"


def test_growth_waits_for_the_burst_to_settle() -> None:
    grown = Schedule(n=125, live_k=5, last_fit_n=100, idle_s=3, busy_s=40)
    assert refit_due(grown, CONFIG) is None
    assert refit_due(dataclasses.replace(grown, idle_s=10, busy_s=0), CONFIG) == \
        "grew from 100 to 125 images"
    assert refit_due(dataclasses.replace(grown, n=124, idle_s=60), CONFIG) is None


def test_a_stream_that_never_pauses_is_not_waited_for_forever() -> None:
    grown = Schedule(n=5000, live_k=5, last_fit_n=100, idle_s=0.5)
    assert refit_due(dataclasses.replace(grown, busy_s=MAX_SETTLE_WAIT_S - 1), CONFIG) is None
    assert refit_due(dataclasses.replace(grown, busy_s=MAX_SETTLE_WAIT_S), CONFIG) is not None


def test_interval_and_switches() -> None:
    quiet = Schedule(n=100, live_k=5, last_fit_n=100, since_fit_s=3600, idle_s=60)
    assert refit_due(quiet, CONFIG) == "interval"
    assert refit_due(dataclasses.replace(quiet, idle_s=1), CONFIG) is None
    off = dataclasses.replace(CONFIG, refit_interval_s=0, refit_growth=0)
    assert refit_due(dataclasses.replace(quiet, n=1000), off) is None
    no_wait = dataclasses.replace(CONFIG, settle_s=0)
    assert refit_due(Schedule(n=20, live_k=0), no_wait) == "first fit"


@pytest.mark.parametrize("n", [20, 33, 1000])
def test_next_try_is_the_smallest_grown_size(n: int) -> None:
    at = next_try_at(n)
    assert at >= n * (1 + RETRY_GROWTH) > at - 1
