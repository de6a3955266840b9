"""A grid of segd's k rule: every combination of its decision settings, replayed on stored
figures, tuned on some seeds and judged on others and on collections left out.

    python bench/bench_k.py --seeds 10 && python bench/bench_k.py --held-out --seeds 10
    python bench/bench_k_grid.py           # the grid: ~1-2 min on 2 cores once bench_k has
                                           # stored the figures (any a rule needs that are
                                           # not stored yet are computed and kept)
    python bench/bench_k_grid.py --top 20  # more of the best rules

The rules of the grid differ from segd's only in how they decide (kselect.decide): the
strength's threshold, the steps up and down, the no-structure test's thresholds and the
rows the strength starts from. So they all decide from the same figures per collection and
seed (kfigures.Known, stored by bench_k.evaluate under .cache/k-study/figures), and a rule
costs a few microseconds per collection once those are there.

Collections: bench_k's 83 (the 33 of its main table, the small-n panel, the well-separated
and the elongated sets). Seeds: ten (0, 1000, ..., 9000). A rule is **tuned** on the first
five seeds (the ones segd's rule was chosen at) and **judged** on the last five, which no
round of the study tuned on; the 15 handwritten-digit collections (bench_k --held-out) are
judged at all ten. Ranking, as bench_k ranks: over the tuning seeds, the most k tests
passed on the 83, among rules whose ratio of the mean ARIs (chosen / true k; the
acceptance's figure) is at least 0.95 at every tuning seed on the 33 and on the 83; ties by
that lowest ratio. Leave one collection out: for each of the 83, the rule ranked best on
the other 82 at the tuning seeds, and how it does on the one left out at the judging seeds.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_k as bk
import kselect_study as ks

from segd.core.kselect import KSelect

TUNE = (0, 1000, 2000, 3000, 4000)
JUDGE = (5000, 6000, 7000, 8000, 9000)
SEEDS = TUNE + JUDGE
GRID: dict[str, tuple[Any, ...]] = {
    "threshold": (0.55, 0.6, 0.65),
    "step_up": (None, 0.0, 0.01, 0.02, 0.03),
    "step_down": (None, 0.03, 0.05, 0.08),
    "step_down_below": (0.8, 0.85, 0.9, math.inf),
    "excess_min": (0.02, 0.03, 0.04),
    "gap_min": (0.05, 0.1, None),
    "small_below": (48, 64, 100),
}
ACCEPT = 0.95  # the acceptance's ratio of the mean ARIs


def grid() -> list[dict[str, Any]]:
    """Every combination of GRID, less those that differ only in a setting that has no
    effect (step_down_below without a step down)."""
    out: list[dict[str, Any]] = []
    for values in itertools.product(*GRID.values()):
        rule = dict(zip(GRID, values, strict=True))
        if rule["step_down"] is None and rule["step_down_below"] != math.inf:
            continue
        out.append(rule)
    return out


def describe(rule: dict[str, Any]) -> str:
    default = KSelect()
    changed = [f"{name} {value}" for name, value in rule.items()
               if value != getattr(default, name)
               and not (name == "step_down_below" and rule["step_down"] is None)]
    return "segd's rule" if not changed else ", ".join(changed)


@dataclass
class Scored:
    """One collection: the k each rule chose at each seed, and what the choice is worth."""

    name: str
    kind: str
    true_k: int
    k: np.ndarray  # (rules, seeds) chosen k
    ok: np.ndarray  # (rules, seeds) the k test passed
    ari: np.ndarray  # (rules, seeds) ARI at the chosen k
    ari_true: float  # nan for true k = 1


def score(coll: bk.Collection, rules: list[dict[str, Any]], seeds: tuple[int, ...]
          ) -> Scored:
    figures = bk.load_figures(coll)
    kk = bk.k_range(coll)
    with threadpool_limits(limits=1):
        ctx = ks.Ctx(ks.project(coll.x, ks.space_dims("pca32")), figures=figures)
        chosen = np.array([[bk.segd_choice(ctx, kk, KSelect(seed=seed, **rule)).k
                            for seed in seeds] for rule in rules])
        ari_at = {k: bk.aris(coll, ctx, k)[0] for k in [1, *kk]}
        _, ari_true = bk.aris(coll, ctx, coll.true_k)
    bk.store(bk.figures_file(coll), figures)
    ok_at = {k: bk.k_ok(bk.Row(coll.name, coll.kind, len(coll.x), coll.true_k, "", k, None,
                               0.0, 0.0, 0.0, "")) for k in ari_at}
    return Scored(coll.name, coll.kind, coll.true_k, chosen,
                  np.vectorize(ok_at.__getitem__)(chosen),
                  np.vectorize(ari_at.__getitem__)(chosen), ari_true)


def _score(args: tuple[bk.Collection, list[dict[str, Any]]]) -> Scored:
    t0 = time.perf_counter()
    out = score(*args, SEEDS)
    print(f"  {args[0].name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


@dataclass
class Totals:
    """Per rule and seed, over a set of collections."""

    ok: np.ndarray  # (rules, seeds) k tests passed
    ratio: np.ndarray  # (rules, seeds) mean ARI at the chosen k / mean ARI at the true k
    total: int


def totals(scored: list[Scored]) -> Totals:
    with_k = [s for s in scored if s.true_k > 1]
    truth = sum(s.ari_true for s in with_k)
    return Totals(sum(s.ok for s in scored).astype(float),
                   sum(s.ari for s in with_k) / truth, len(scored))


def best(f33: Totals, f83: Totals, cols: list[int], default: int) -> np.ndarray:
    """Rules ranked (best first) at the seeds `cols`: the mean k tests on the 83 among those
    whose lowest ratio of mean ARIs reaches ACCEPT on the 33 and on the 83, then by that
    lowest ratio; the others after, by the same figures. On a tie, rule `default` first:
    segd's rule changes only for a rule that does better."""
    low = np.minimum(f33.ratio[:, cols].min(axis=1), f83.ratio[:, cols].min(axis=1))
    passed = f83.ok[:, cols].mean(axis=1)
    challenger = np.arange(len(low)) != default
    return np.lexsort((challenger, -low, -passed, low < ACCEPT))


def row(label: str, i: int, f33: Totals, f83: Totals, digits: Totals) -> str:
    t, j = list(range(len(TUNE))), list(range(len(TUNE), len(SEEDS)))
    return (f"| {label} | {f33.ok[i, t].mean():.1f} / {f83.ok[i, t].mean():.1f} | "
            f"{f33.ratio[i, t].min():.3f} / {f83.ratio[i, t].min():.3f} | "
            f"{f33.ok[i, j].mean():.1f} / {f83.ok[i, j].mean():.1f} | "
            f"{f33.ratio[i, j].min():.3f} / {f83.ratio[i, j].min():.3f} | "
            f"{digits.ok[i].mean():.1f} of {digits.total} | {digits.ratio[i].min():.3f} |")


def leave_one_out(scored: list[Scored], main: list[Scored], default: int
                  ) -> tuple[int, int, float, int]:
    """For each collection, the best rule on the others at the tuning seeds; the k tests it
    passes on the one left out at the judging seeds (passed, tried), the ratio of the mean
    ARIs over all those held-out choices, and how often it was rule `default`."""
    t, j = list(range(len(TUNE))), list(range(len(TUNE), len(SEEDS)))
    passed = tried = picked_default = 0
    chosen_ari = true_ari = 0.0
    for s in scored:
        pick = best(totals([o for o in main if o is not s]),
                    totals([o for o in scored if o is not s]), t, default)[0]
        passed += int(s.ok[pick, j].sum())
        tried += len(j)
        if s.true_k > 1:
            chosen_ari += float(s.ari[pick, j].sum())
            true_ari += s.ari_true * len(j)
        picked_default += pick == default
    return passed, tried, chosen_ari / true_ari, picked_default


def default_rule() -> dict[str, Any]:
    """segd's rule: KSelect's defaults for the settings of GRID."""
    d = KSelect()
    return {name: getattr(d, name) for name in GRID}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=10, help="rules to show (default 10)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    rules = grid()
    default = rules.index(default_rule())  # segd's rule must be in the grid
    main33 = bk.real_collections() + bk.synthetic_collections()
    rest = bk.panel_collections() + bk.clean_collections() + bk.elongated_collections()
    digits = bk.held_out_collections()
    colls = sorted(main33 + rest + digits, key=lambda c: -len(c.x))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        done = dict(zip([c.name for c in colls],
                        pool.map(_score, [(c, rules) for c in colls]), strict=True))
    seconds = time.perf_counter() - t0
    s33 = [done[c.name] for c in main33]
    s83 = s33 + [done[c.name] for c in rest]
    f33, f83, fd = totals(s33), totals(s83), totals([done[c.name] for c in digits])
    t = list(range(len(TUNE)))
    order = best(f33, f83, t, default)
    print(f"{len(rules)} rules x {len(colls)} collections x {len(SEEDS)} seeds in "
          f"{seconds:.0f} s on {args.jobs} processes\n")
    print("| rule | tuning seeds: k tests, 33 / 83 | lowest ratio of mean ARIs, 33 / 83 | "
          "judging seeds: k tests, 33 / 83 | lowest ratio, 33 / 83 | digits (ten seeds): "
          "k tests | lowest ratio |")
    print("|---|---|---|---|---|---|---|")
    print(row(f"**{describe(rules[default])}** (rank {list(order).index(default) + 1})",
              default, f33, f83, fd))
    for rank, i in enumerate(order[: args.top], 1):
        print(row(f"{rank}. {describe(rules[i])}", i, f33, f83, fd))
    j = list(range(len(TUNE), len(SEEDS)))
    for label, cols in (("tuning", t), ("judging", j)):
        most = int(np.argmax(f83.ok[:, cols].mean(axis=1)))
        print(row(f"most k tests on the 83 at the {label} seeds, any ratio: "
                  f"{describe(rules[most])}", most, f33, f83, fd))
    print("\nThe 33's collections that segd's rule fails at some seed: the seeds (of ten) it "
          "passes at, and the most any rule of the grid passes at\n")
    print("| collection | true k | segd's rule: k per seed | passes | best rule of the grid "
          "| its k per seed |")
    print("|---|---|---|---|---|---|")
    for sc in s33:
        if sc.ok[default].all():
            continue
        top = int(np.argmax(sc.ok.sum(axis=1)))
        better = sc.ok[top].sum() > sc.ok[default].sum()
        print(f"| {sc.name} | {sc.true_k} | {', '.join(map(str, sc.k[default]))} | "
              f"{sc.ok[default].sum()} | "
              + (f"{sc.ok[top].sum()}: {describe(rules[top])} | "
                 f"{', '.join(map(str, sc.k[top]))} |" if better else "none passes more | |"))
    every = f33.ok == f33.total
    print(f"\nRules that pass every k test of the 33 at one seed or more: "
          f"{int(every.any(axis=1).sum())} of {len(rules)}; and with a ratio of the mean "
          f"ARIs of at least {ACCEPT} there (the acceptance, at one seed): "
          f"{int((every & (f33.ratio >= ACCEPT)).any(axis=1).sum())}.")
    passed, tried, ratio, picked = leave_one_out(s83, s33, default)
    d_passed = int(sum(s.ok[default, j].sum() for s in s83))
    print(f"\nLeave one collection out (tuned without it at seeds {TUNE[0]}-{TUNE[-1]}, "
          f"judged on it at {JUDGE[0]}-{JUDGE[-1]}): {passed} of {tried} k tests, ratio of "
          f"the mean ARIs {ratio:.3f}; segd's rule picked {picked} of {len(s83)} times. "
          f"segd's rule itself at those seeds: {d_passed} of {tried}.")


if __name__ == "__main__":
    main()
