"""kill -9 the real daemon at random instants, many times, and check the invariant each time.

    .venv/bin/python bench/soak_kill.py [--rounds 50] [--seed 1] [--burst 30]
                                        [--max-delay 3.0] [--workdir DIR] [--keep]

Each round (tests/e2e/test_reliability.py `kill_round`, the same code the test runs 5 times):
start `segd run` (recovering what the previous kill left), drop a burst of photos, ask
for `segd refit --k K` with a K different from the last round's (clustering.on_refit:
move, so many files move between cluster folders), kill -9 the daemon after a random
delay, restart it, wait until everything is filed, stop it and check the invariant
(every file ever dropped exactly once, byte-identical; the store agrees with the disk; no
temp file, no open journal row; the sentinel folder beside segd's folders unchanged).

Prints one line per round and a summary: rounds, kills, kills that cut a refit short,
journaled moves recovered at restart, files checked, files lost (0, or it stops with the
invariant's report and exit status 1).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

from invariant import InvariantError  # noqa: E402
from reliability_env import Env  # noqa: E402
from test_reliability import MOVE_ON_REFIT, kill_round  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--burst", type=int, default=30, help="photos dropped per round")
    ap.add_argument("--max-delay", type=float, default=3.0,
                    help="kill at a uniform random delay in [0.3, this] s after the refit ask")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="segd-soak-kill-"))
    env = Env(root / "segd", MOVE_ON_REFIT)
    rng = random.Random(args.seed)
    started = time.monotonic()
    cut_short = recovered = 0
    try:
        env.daemon.start(timeout=120)
        env.seed(40)
        env.daemon.stop(timeout=30)
        k = 0
        for i in range(args.rounds):
            k = rng.choice([c for c in range(2, 7) if c != k])
            r = kill_round(env, rng, i, k, burst=args.burst, max_delay=args.max_delay)
            cut_short += not r["refit_completed_before_kill"]
            recovered += r["moves_recovered"]
            print(f"round {i + 1}/{args.rounds}: {r}", flush=True)
        env.daemon.start(timeout=120)
        summary = env.finish()
    except InvariantError as exc:
        print(f"INVARIANT VIOLATED after {time.monotonic() - started:.0f} s:\n{exc}")
        print(f"work folder kept: {root}")
        return 1
    finally:
        env.daemon.cleanup()
    print(f"\nrounds: {args.rounds}, kills survived: {args.rounds}, kills that cut a refit "
          f"short: {cut_short}, journaled moves recovered: {recovered}, files checked: "
          f"{summary.dropped}, files lost: 0 ({time.monotonic() - started:.0f} s)")
    print(f"[invariant] {summary.describe()}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
