"""Explore the crash states of a recording: build each distinct state, check it, count,
and say which lost operations explain the failures."""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from crashsim.check import Checker
from crashsim.fsmodel import Sync
from crashsim.replay import Recording
from crashsim.states import CrashState, Explorer


@dataclass
class Finding:
    state: CrashState
    after: str  # the last operation issued before the power went
    dropped: list[str]  # the operations the disk did not keep
    detail: str


@dataclass
class Figures:
    recording: str
    model: str
    torn: bool
    ops: int
    candidates: int  # bounded choices over every prefix
    considered: int  # of those, built (all of them, or the sample)
    distinct: int = 0  # distinct trees among them: each checked once
    failed: int = 0
    failed_kill9: int = 0  # of the failures, states a kill -9 could leave too
    recovered_moves: int = 0  # journaled moves recovery settled, over all checked states
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    # Why states failed: the one lost operation (kind) that alone fails at that prefix.
    causes: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        return (f"{self.recording:9} {self.model:5}{' torn' if self.torn else '     '} "
                f"ops={self.ops:5} candidates={self.candidates:7} built={self.considered:7} "
                f"distinct={self.distinct:6} failed={self.failed:5} "
                f"(kill-9 {self.failed_kill9}) moves recovered={self.recovered_moves:5} "
                f"{self.seconds:6.1f} s")


def explore(name: str, rec: Recording, checker: Checker, *, model: str = "posix",
            torn: bool = False, pairs: bool = True, sample: int | None = None,
            focus: bool = False, seed: int = 0, inodes: Mapping[int, Path] | None = None,
            keep_findings: int = 50) -> Figures:
    """Check every distinct state, or a seeded sample of about `sample` of them.

    A sample keeps, at every prefix, the kill -9 state and the state that lost everything
    not yet durable (the harshest), and fills up with other choices at random. `focus`
    keeps only crash points around directory operations and syncs (just after a link,
    unlink, mkdir..., just before a sync): between them only a file's bytes grow."""
    started = time.monotonic()
    ex = Explorer(rec.initial, rec.ops, model=model, torn=torn, pairs=pairs)
    candidates = [s for s in ex.states() if not focus or boundary(ex, s.prefix)]
    chosen = candidates
    if sample is not None and sample < len(candidates):
        must = [s for s in candidates
                if not s.dropped or s.dropped == frozenset(ex.pending(s.prefix))]
        kept = set(must)
        rest = [s for s in candidates if s not in kept]
        chosen = must + random.Random(seed).sample(rest, max(0, min(sample - len(must),
                                                                    len(rest))))
    fig = Figures(name, model, torn, len(ex.ops), len(candidates), len(chosen))
    verdict: dict[str, bool] = {}  # by tree digest
    state_ok: dict[CrashState, bool] = {}
    failures: list[CrashState] = []
    for state, img, digest in ex.images(chosen):
        if digest in verdict:
            state_ok[state] = verdict[digest]
            continue
        outcome = checker.check(img, inodes)
        verdict[digest] = state_ok[state] = outcome.ok
        fig.recovered_moves += outcome.recovered
        if outcome.ok:
            continue
        failures.append(state)
        fig.failed += 1
        fig.failed_kill9 += not state.dropped
        if len(fig.findings) < keep_findings:
            fig.findings.append(Finding(state, describe(ex, rec, state.prefix - 1),
                                        [describe(ex, rec, i) for i in sorted(state.dropped)],
                                        outcome.detail))
    fig.distinct = len(verdict)
    units = {state.prefix: ex.units(ex.pending(state.prefix)) for state in failures}
    for state in failures:
        fig.causes[cause(ex, rec, state, units[state.prefix], state_ok)] += 1
    fig.seconds = time.monotonic() - started
    return fig


def boundary(ex: Explorer, prefix: int) -> bool:
    """Just after a directory operation, or just before a sync (or the very start)."""
    ops = ex.ops
    after_dir_op = prefix > 0 and not ops[prefix - 1].is_data \
        and not isinstance(ops[prefix - 1], Sync)
    before_sync = prefix < len(ops) and isinstance(ops[prefix], Sync)
    return prefix == 0 or after_dir_op or before_sync


def cause(ex: Explorer, rec: Recording, state: CrashState, units: list[tuple[int, ...]],
          state_ok: dict[CrashState, bool]) -> str:
    """The kind of lost operation that alone makes this prefix fail, if one does."""
    if not state.dropped or state_ok.get(CrashState(state.prefix, frozenset())) is False:
        return "nothing lost (the kill -9 state at that point fails too)"
    alone = [u for u in units if set(u) <= state.dropped
             and state_ok.get(CrashState(state.prefix, frozenset(u))) is False]
    if alone:
        return "lost: " + general(ex.ops[alone[0][0]].describe(rec.names))
    # Name the directory operations among the lost ones (file bytes only if there are none).
    lost = [i for i in state.dropped if not ex.ops[i].is_data] or sorted(state.dropped)
    return "lost together: " + ", ".join(sorted({general(ex.ops[i].describe(rec.names))
                                                 for i in lost}))


def general(text: str) -> str:
    """`mkdir library/cluster-04` -> `mkdir library/cluster-N`; byte ranges dropped."""
    text = re.sub(r" \[\d+\+\d+\]", "", text)
    text = re.sub(r"cluster-\d+", "cluster-N", text)
    return re.sub(r"(inbox|library/cluster-N|quarantine)/[^ ]+\.jpg", r"\1/<photo>", text)


def describe(ex: Explorer, rec: Recording, i: int) -> str:
    if i < 0:
        return "(nothing yet)"
    return f"#{i} {ex.ops[i].describe(rec.names)}"
