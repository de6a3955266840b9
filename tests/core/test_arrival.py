"""The arrival decision on its own: rows and centroids in, the plan out (no store, no files)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from segd.core.arrival import ArrivalPlan, plan_arrival
from segd.core.cluster import assign
from segd.core.filing import Filing

DIM = 8
NO_IDS, NO_CENTROIDS = np.empty(0, np.int64), np.empty((0, DIM), np.float32)


@dataclass(frozen=True)
class Row:
    id: int
    state: str
    sha256: str


def unit(*values: float) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


# Clusters 7 and 3 (ids need not follow the order of the rows), along the first two axes.
IDS = np.array([7, 3], np.int64)
CENTROIDS = np.stack([unit(1.0), unit(0.0, 1.0)])


def test_new_file_waits_while_there_are_no_clusters() -> None:
    plan = plan_arrival(None, "s1", unit(1.0), NO_IDS, NO_CENTROIDS)
    assert plan == ArrivalPlan(forget=None, image_id=None, record=True, filing=None)
    assert plan.waits


def test_waiting_file_that_arrives_again_unchanged_needs_nothing() -> None:
    plan = plan_arrival(Row(5, "pending", "s1"), "s1", unit(1.0), NO_IDS, NO_CENTROIDS)
    assert plan == ArrivalPlan(image_id=5, record=False)
    assert plan.waits


def test_waiting_file_rewritten_keeps_its_row_with_the_new_content() -> None:
    plan = plan_arrival(Row(5, "pending", "s1"), "s2", unit(1.0), NO_IDS, NO_CENTROIDS)
    assert plan == ArrivalPlan(image_id=5, record=True)
    assert plan.waits


@pytest.mark.parametrize("state", ["sorted", "quarantined"])
def test_a_row_left_by_an_earlier_file_of_the_name_is_forgotten(state: str) -> None:
    # Same bytes or not: the row is another file's history, never this arrival's.
    stale = Row(9, state, "s1")
    waiting = plan_arrival(stale, "s1", unit(1.0), NO_IDS, NO_CENTROIDS)
    assert waiting == ArrivalPlan(forget=9, image_id=None, record=True)
    filed = plan_arrival(stale, "s1", unit(1.0), IDS, CENTROIDS)
    assert (filed.forget, filed.image_id, filed.record) == (9, None, True)
    assert filed.filing is not None and filed.filing.cluster_id == 7


def test_with_clusters_a_new_file_goes_to_the_nearest_one() -> None:
    near_second = unit(0.2, 1.0)
    plan = plan_arrival(None, "s1", near_second, IDS, CENTROIDS)
    _, dists = assign(near_second[None, :], CENTROIDS)
    assert plan == ArrivalPlan(record=True, filing=Filing.sorted_into(3, float(dists[0])))
    assert not plan.waits
    assert plan.filing is not None and plan.filing.distance == pytest.approx(
        1.0 - 1.0 / np.sqrt(1.04))  # cosine distance to (0, 1)
    exact = plan_arrival(None, "s1", unit(1.0), IDS, CENTROIDS)
    assert exact.filing == Filing("sorted", 7, 0.0)


def test_with_clusters_a_waiting_file_is_filed_under_its_own_row() -> None:
    # Unchanged or not, its content is written again with the filing (as before the split).
    for sha in ("s1", "s2"):
        plan = plan_arrival(Row(5, "pending", "s1"), sha, unit(1.0), IDS, CENTROIDS)
        assert plan == ArrivalPlan(image_id=5, record=True, filing=Filing("sorted", 7, 0.0))


def test_a_single_cluster_takes_everything() -> None:
    plan = plan_arrival(None, "s1", unit(0.0, 0.0, 1.0), IDS[:1], CENTROIDS[:1])
    assert plan.filing == Filing("sorted", 7, pytest.approx(1.0))
