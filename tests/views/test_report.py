"""The fit summary says how k was chosen, how sure that is, and when there is no structure."""

from __future__ import annotations

import numpy as np

from segd.core.cluster import FitResult
from segd.views.report import choice_line, fit_table


def fit(**kw: object) -> FitResult:
    base: dict = dict(k=4, labels=np.zeros(3, dtype=int), distances=np.zeros(3),
                      centroids=np.zeros((4, 2)), scores={2: 0.71, 3: 0.84, 4: 0.86, 5: 0.62},
                      rule="strength", runner_up=3, margin=0.06)
    base.update(kw)
    return FitResult(**base)  # type: ignore[arg-type]


def test_the_choice_names_the_rule_margin_and_runner_up() -> None:
    line = choice_line(fit())
    assert line == "k = 4 chosen by the prediction strength, margin +0.060; runner-up k = 3."


def test_the_table_marks_the_chosen_k_under_the_rule_that_chose_it() -> None:
    table = fit_table(fit(), {"cluster-01": 2, "cluster-02": 1})
    lines = table.splitlines()
    assert lines[0] == "  k  prediction strength"
    assert [ln for ln in lines if ln.endswith("<- chosen")] == [lines[3]]
    assert lines[3].startswith("  4")
    assert "runner-up k = 3" in table and "cluster-02" in table


def test_no_structure_is_said_plainly_and_nothing_is_marked_chosen() -> None:
    table = fit_table(fit(k=1, structured=False, runner_up=None, margin=-0.1),
                      {"cluster-01": 3})
    assert "No cluster structure found" in table and "--k N" in table
    assert "<- chosen" not in table and "candidate" not in table


def test_no_structure_names_the_split_that_came_nearest() -> None:
    line = choice_line(fit(k=1, structured=False, runner_up=3, margin=0.005))
    assert line.endswith("Pass --k N to split them anyway (the best candidate was k = 3).")


def test_a_fixed_k_is_reported_as_asked() -> None:
    assert choice_line(fit(rule="fixed", scores={})) == \
        "k = 4 as asked (--k or clustering.k)."
