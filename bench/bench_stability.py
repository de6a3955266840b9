"""Refit stability under a burst: a real `segd run`, N photos dropped at once, then 20 at a time.

    .venv/bin/python bench/bench_stability.py [--cases 600,2000] [--trickle 5] [--sort-seeds 5]
                                              [--keep DIR]

Each case starts a fresh `segd run` (tests/support/daemon_harness.py; CPU, the default
clustering config) on an empty inbox, copies the case's burst into the inbox in one go,
waits until every photo is filed and the daemon has been quiet for a while (no refit
running, nothing logged), then drops `--trickle` batches of 20 more photos, each waited on
the same way. Cases:

  600   600 photos of the distinct five of clothing10 (120 a class), the trickle from the
        rest of those five;
  2000  2,000 of clothing10's ten classes and scenes6 (2,485 photos, 16 classes), the trickle
        from the rest.

Reported per case: each refit (trigger, n, k, whether it replaced the clustering or updated
it, files re-filed), the files re-filed per photo (every move after a photo's first filing),
the folders created and removed, and the adjusted Rand index of the final library against
the photos' classes, beside the ARI of `segd sort` on the same photos with the same config
(random_state 0, the daemon's) and at other random_states: how far the reference itself
moves with nothing but its seed.
Refits are read from the daemon's log (its one summary line per refit). scenes6 is read in
place and copied only into the benchmark's temporary folders.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import benchlib
import yaml
from daemon_harness import DaemonProcess, Tree, wait_until, write_config
from sklearn.metrics import adjusted_rand_score

from segd.config import ClusteringConfig
from segd.service import control

SCENES = Path("/work/shared/datasets/scenes6")
BATCH = 20
QUIET_S = 4.0  # after the settle time: nothing logged this long = the daemon is done
SEP = "__"  # <class>__<original name>: the class travels in the file name
# The default clustering (the harness's base config shrinks it for the tests).
_DEFAULT = ClusteringConfig()
CLUSTERING = {"min_images": _DEFAULT.min_images, "k_max": _DEFAULT.k_max,
              "n_init": _DEFAULT.n_init}
REFIT = re.compile(r"refit \((?P<trigger>[^)]*)\)(?P<rest>.*)$")


@dataclass
class Refit:
    trigger: str
    n: int
    k: int
    moved: int
    outcome: str  # what the summary says it did (replaced / updated / waiting...)


@dataclass
class CaseResult:
    name: str
    photos: int
    refits: list[Refit] = field(default_factory=list)
    folders_made: int = 0
    folders_gone: int = 0
    ari: float = 0.0
    sort_seeds: list[tuple[float, int]] = field(default_factory=list)  # (ARI, k) at 0, 1, ...
    final_k: int = 0
    seconds: float = 0.0

    @property
    def moves(self) -> int:
        return sum(r.moved for r in self.refits)

    @property
    def sort_ari(self) -> float:
        """`segd sort`'s ARI at random_state 0, the daemon's."""
        return self.sort_seeds[0][0]

    @property
    def sort_k(self) -> int:
        return self.sort_seeds[0][1]


def photo_sets(name: str) -> tuple[list[Path], list[Path]]:
    """(burst, trickle pool) for a case, in a fixed shuffled order."""
    rnd = random.Random(0)
    if name == "600":
        by_class = {c: sorted((benchlib.DATASET / c).glob("*.jpg")) for c in benchlib.DISTINCT_FIVE}
        for files in by_class.values():
            rnd.shuffle(files)
        burst = [p for files in by_class.values() for p in files[:120]]
        rest = [p for files in by_class.values() for p in files[120:]]
    elif name == "2000":
        everything = sorted(benchlib.DATASET.glob("*/*.jpg")) + sorted(SCENES.glob("*/*.jpg"))
        rnd.shuffle(everything)
        burst, rest = everything[:2000], everything[2000:]
    else:
        raise SystemExit(f"unknown case {name!r} (600 or 2000)")
    rnd.shuffle(burst)
    rnd.shuffle(rest)
    return burst, rest


def label_of(path: Path) -> str:
    return path.name.split(SEP, 1)[0]


def drop(files: list[Path], inbox: Path) -> None:
    for src in files:
        shutil.copyfile(src, inbox / f"{src.parent.name}{SEP}{src.name}")


def parse_refits(log: str) -> list[Refit]:
    out = []
    for line in log.splitlines():
        m = REFIT.search(line)
        if m is None or "dry run" in m["trigger"]:
            continue
        rest = m["rest"]
        nk = re.search(r"\bn=(\d+)(?: k=(\d+))?", rest)
        if nk is None:
            continue
        moved = re.search(r"\bmoved=(\d+)", rest)
        outcome = ("updated" if "kept the clusters" in rest else
                   "no structure" if "no clusters" in rest else
                   "replaced" if "replaced" in rest else "refit")
        out.append(Refit(m["trigger"], int(nk[1]), int(nk[2] or 0),
                         int(moved[1]) if moved else 0, outcome))
    return out


def wait_quiet(daemon: DaemonProcess, tree: Tree, expect: int, quiet_s: float,
               timeout: float) -> None:
    """Every photo filed, no refit running, and the log unchanged for `quiet_s`."""
    tree.wait_drained(expect, timeout, daemon)
    sock = tree.config.parent / "state" / "control.sock"
    last_len, last_change = -1, time.monotonic()

    def quiet() -> bool:
        nonlocal last_len, last_change
        size = len(daemon.log())
        if size != last_len:
            last_len, last_change = size, time.monotonic()
        status = control.request(sock, {"cmd": "status"}, timeout=30)["status"]
        running = status.get("refit_running") or status.get("queue_depth") or \
            status.get("in_flight")
        if running:
            last_change = time.monotonic()
        return time.monotonic() - last_change >= quiet_s and tree.counts()[0] == 0

    wait_until(quiet, timeout, "the daemon to go quiet", interval=0.5,
               on_timeout=daemon.log_tail)


def folder_events(tree: Tree, seen: set[str], gone: set[str]) -> None:
    now = {p.name for p in tree.library.iterdir() if p.is_dir()} if tree.library.is_dir() else set()
    gone.update(seen - now)
    seen.update(now)


def library_ari(library: Path) -> tuple[float, int]:
    truth, pred = [], []
    folders = [d for d in sorted(library.iterdir()) if d.is_dir()]
    for i, d in enumerate(folders):
        for f in d.iterdir():
            if f.is_file():
                truth.append(label_of(f))
                pred.append(i)
    return float(adjusted_rand_score(truth, pred)), sum(1 for d in folders
                                                        if any(d.iterdir()))


def sort_aris(files: list[Path], config: Path, work: Path, seeds: int
              ) -> list[tuple[float, int]]:
    """`segd sort` of `files` with the case's config at random_state 0..seeds-1: (ARI, k)
    each. The config's copies sit beside it, so they share its store (the embeddings)."""
    src = work / "sort-src"
    src.mkdir()
    drop(files, src)
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    out = []
    for seed in range(seeds):
        settings["clustering"]["random_state"] = seed
        seeded = config.with_name(f"sort-seed{seed}.yaml")
        seeded.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
        dest = work / f"sort-dest-{seed}"
        run = subprocess.run([str(benchlib.SEGD), "sort", str(src), str(dest),
                              "--no-progress", "--config", str(seeded)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"segd sort failed:\n{run.stderr[-3000:]}")
        out.append(library_ari(dest))
    return out


def run_case(name: str, trickle: int, work: Path, settle_s: float, sort_seeds: int
             ) -> CaseResult:
    burst, pool = photo_sets(name)
    batches = [pool[i * BATCH:(i + 1) * BATCH] for i in range(trickle)]
    root = work / f"case-{name}"
    # The default rescan interval: the harness's 1 s would re-read every waiting photo.
    config = write_config(root, {"clustering": CLUSTERING | {"settle_s": settle_s},
                                 "watch": {"rescan_interval_s": 300.0}})
    tree = Tree(config)
    daemon = DaemonProcess(config)
    result = CaseResult(name, len(burst) + sum(len(b) for b in batches))
    seen: set[str] = set()
    gone: set[str] = set()
    started = time.monotonic()
    daemon.start(timeout=120)
    try:
        drop(burst, tree.inbox)
        filed = len(burst)
        deadline = time.monotonic() + 1800
        while True:  # watch the folders come and go while the burst is filed
            folder_events(tree, seen, gone)
            i, lib, q = tree.counts()
            if i == 0 and lib + q >= filed:
                break
            if time.monotonic() > deadline or not daemon.alive():
                raise SystemExit(f"the burst was not filed:\n{daemon.log_tail()}")
            time.sleep(0.2)
        wait_quiet(daemon, tree, filed, settle_s + QUIET_S, 1800)
        folder_events(tree, seen, gone)
        for batch in batches:
            drop(batch, tree.inbox)
            filed += len(batch)
            wait_quiet(daemon, tree, filed, settle_s + QUIET_S, 600)
            folder_events(tree, seen, gone)
        result.seconds = time.monotonic() - started
        daemon.stop(timeout=60)
    finally:
        daemon.cleanup()
    result.refits = parse_refits(daemon.all_logs())
    result.folders_made, result.folders_gone = len(seen), len(gone)
    result.ari, result.final_k = library_ari(tree.library)
    everything = burst + [p for b in batches for p in b]
    result.sort_seeds = sort_aris(everything, config, root, sort_seeds)
    return result


def print_case(r: CaseResult) -> None:
    print(f"\n== {r.name}: {r.photos} photos ({r.seconds:.0f} s)")
    print("| # | trigger | n | k | outcome | re-filed |")
    print("|---|---|---|---|---|---|")
    for i, f in enumerate(r.refits, 1):
        print(f"| {i} | {f.trigger} | {f.n} | {f.k} | {f.outcome} | {f.moved} |")
    print(f"refits {len(r.refits)}, files re-filed {r.moves} = {r.moves / r.photos:.3f} per photo"
          f"; folders made {r.folders_made}, removed {r.folders_gone}")
    print(f"final ARI {r.ari:.3f} at k={r.final_k}; segd sort on the same photos: ARI "
          f"{r.sort_ari:.3f} at k={r.sort_k}")
    if len(r.sort_seeds) > 1:
        print(f"segd sort at random_state 0..{len(r.sort_seeds) - 1}: ARI (k) "
              + ", ".join(f"{a:.3f} ({k})" for a, k in r.sort_seeds)
              + f"; mean ARI {statistics.mean(a for a, _ in r.sort_seeds):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="600,2000")
    ap.add_argument("--trickle", type=int, default=10, help="batches of 20 after the burst")
    ap.add_argument("--settle-s", type=float, default=10.0,
                    help="the daemon's clustering.settle_s (how long the quiet wait adds)")
    ap.add_argument("--sort-seeds", type=int, default=5,
                    help="also run segd sort at this many random_states (how much the "
                         "reference itself varies)")
    ap.add_argument("--keep", type=Path, help="work here and keep the folders")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="segd-bench-stability-", dir="/dev/shm"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for name in args.cases.split(","):
            results.append(run_case(name, args.trickle, work, args.settle_s,
                                    max(args.sort_seeds, 1)))
            print_case(results[-1])
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| case | photos | refits | k at each | re-filed per photo | folders made/removed "
          "| ARI | segd sort ARI | segd sort, other random_states |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ks = ", ".join(str(f.k) for f in r.refits)
        others = [a for a, _ in r.sort_seeds[1:]]
        spread = f"{min(others):.3f}-{max(others):.3f}" if others else "-"
        print(f"| {r.name} | {r.photos} | {len(r.refits)} | {ks} | {r.moves / r.photos:.3f} | "
              f"{r.folders_made}/{r.folders_gone} | {r.ari:.3f} | {r.sort_ari:.3f} | "
              f"{spread} |")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"refits": [f.__dict__ for f in r.refits]}
                                         for r in results], indent=2))


if __name__ == "__main__":
    main()
