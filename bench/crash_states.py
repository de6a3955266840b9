"""Power loss, explored: every crash state of the real daemon's recorded runs, checked.

    .venv/bin/python bench/crash_states.py [--seed-photos 10] [--burst 10] [--models posix,ext4]
                                           [--torn] [--no-pairs] [--sample N] [--daemon N]
                                           [--workdir DIR] [--keep]

Records `segd run` (first run, a burst of arrivals, a start-up recovery) and `segd refit`
under strace (tests/support/crashsim/scenario.py), then for each recording and each
persistence model builds every crash state (every prefix of the operations; at each, the
bounded choices of what the disk had not made durable: tests/support/crashsim/states.py),
puts each distinct one on disk, runs segd's start-up recovery on it and checks the
invariant. Prints one line per recording and model, the causes of the failures, and the
first failing states in full. `--daemon N` re-checks up to N failing states per recording
with the real `segd run` (start, watch, stop) instead of the in-process recovery calls.
Exit status 1 if any state failed.
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

from crashsim import scenario, strace  # noqa: E402
from crashsim.explore import Figures, explore  # noqa: E402
from crashsim.states import Explorer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed-photos", type=int, default=10)
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--refit-k", type=int, default=4)
    ap.add_argument("--models", default="posix,ext4")
    ap.add_argument("--torn", action="store_true",
                    help="each page of each write may be lost on its own (torn writes)")
    ap.add_argument("--no-pairs", action="store_true", help="drop single units only")
    ap.add_argument("--sample", type=int, default=None, help="states per recording")
    ap.add_argument("--daemon", type=int, default=0,
                    help="failing states per recording to re-check with the real daemon")
    ap.add_argument("--show", type=int, default=2, help="failing states to print in full")
    ap.add_argument("--only", default=None, help="recordings to explore (comma-separated)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="explore the recordings a kept --workdir holds instead of recording")
    args = ap.parse_args()
    if not strace.available():
        print("strace is not installed (apt-get install strace)", file=sys.stderr)
        return 2

    base = args.workdir or scenario.work_root(Path(tempfile.mkdtemp(prefix="segd-crash-")))
    root, traces, saved = base / "tree", base / "traces", base / "scenario.pickle"
    started = time.monotonic()
    if args.reuse and saved.exists():
        with open(saved, "rb") as fh:
            scen = pickle.load(fh)
    else:
        shutil.rmtree(root, ignore_errors=True)
        scen = scenario.build(root, traces, seed=args.seed_photos, burst=args.burst,
                              refit_k=args.refit_k)
        with open(saved, "wb") as fh:
            pickle.dump(scen, fh)
    verb = "loaded" if args.reuse and saved.exists() else "recorded"
    print(f"{verb} in {time.monotonic() - started:.1f} s: " + ", ".join(
        f"{name} {len(rec.ops)} ops ({scen.seconds[name]:.1f} s)"
        for name, rec in scen.recordings.items()))
    figures: list[Figures] = []
    variants = [(m, args.torn) for m in args.models.split(",")]
    only = args.only.split(",") if args.only else list(scen.recordings)
    for name, rec in scen.recordings.items():
        if name not in only:
            continue
        for model, torn in variants:
            fig = explore(name, rec, scen.checker(name), model=model, torn=torn,
                          pairs=not args.no_pairs, sample=args.sample,
                          inodes=scen.inodes[name])
            figures.append(fig)
            print(fig.line(), flush=True)
            for why, count in fig.causes.most_common():
                print(f"    {count:6} {why}")
            if args.daemon and fig.findings:
                confirm(fig, rec, scen, args.daemon)
    print()
    for fig in figures:
        for f in fig.findings[: args.show]:
            print(f"== {fig.recording} {fig.model}: {f.state.kind} after {f.after}")
            print("   lost: " + ("; ".join(f.dropped) or "nothing"))
            print("   " + f.detail.replace("\n", "\n   "))
    total = sum(f.distinct for f in figures)
    failed = sum(f.failed for f in figures)
    print(f"\n{total} distinct states checked, {failed} failed, "
          f"{time.monotonic() - started:.0f} s in all")
    if not args.keep and args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


def confirm(fig: Figures, rec: scenario.Recording, scen: scenario.Scenario, n: int) -> None:
    """Re-check failing states with the real daemon's start-up."""
    real = scen.checker(fig.recording, daemon=True)
    ex = Explorer(rec.initial, rec.ops, model=fig.model, torn=fig.torn)
    states = [f.state for f in fig.findings[:n]]
    still = 0
    for _, img, _ in ex.images(states):
        still += not real.check(img, scen.inodes[fig.recording]).ok
    print(f"    the real daemon's start-up: {still} of {len(states)} still fail")


if __name__ == "__main__":
    sys.exit(main())
