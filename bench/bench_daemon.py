"""The daemon end to end: drop-to-sorted latency of single files, and the drain of a burst.

    .venv/bin/python bench/bench_daemon.py [--data DIR] [--burst N] [--singles N]
                                           [--repeats R]

A real `segd run` (tests/support/daemon_harness.py starts it) in a temporary folder tree, with
`allow_root: true`, `gpu: off`, `min_images: 10`, no timed or growth refits and no periodic
rescans. It is seeded with 20 of the test photos (tests/data/photos), which wait as pending
until the first fit files them; everything after that is timed against fitted clusters.

    (1) latency of single files, one at a time (the daemon idle before each drop):
        rename  - the photo is copied to a staging folder on the same filesystem, then
                  renamed into the inbox (an atomic arrival: inotify's moved-to event);
        copy    - `shutil.copy` straight into the inbox (the close-after-write event),
                  timed from the moment the copy returns.
        The clock stops when the file has left the inbox and lies in a library folder
        (polled every 1 ms). Median, p95, max over --singles files each (default 50).
    (2) a burst: --burst files (default 1,000) are copied into a staging folder first
        (synced), then renamed into the inbox of the fitted daemon all at once; the clock
        runs from the first rename until the inbox is empty and all N lie in the library.
        Alternating with it, `segd sort SRC DEST --k 5 --no-progress` as a subprocess on
        the same N files (whole command: start-up, embedding, clustering, copies, sync).
        --repeats rounds (default 2), burst and sort interleaved; medians.

Images: the "distinct five" of clothing10 (949 photos) or every image under DIR, reused
under distinct names when N exceeds what there is. The daemon logs no embedding rate of
its own; the burst's steady rate is taken from the inbox count sampled every 20 ms (the
rate between 10 % and 90 % drained), next to the rate from the daemon's "sorted" log lines
(1 s timestamps). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

import benchlib  # noqa: E402
from daemon_harness import DaemonProcess, photos, wait_until, write_config  # noqa: E402

SEEDS = 20
POLL_S = 0.001  # single-file polling
BURST_POLL_S = 0.02  # burst progress sampling (the poller shares the 2 cores)
SORTED_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d) INFO sorted (\S+) -> .*, (\d+) ms, decode")

OVERRIDES = {
    "allow_root": True,
    "model": {"gpu": "off"},
    "clustering": {"min_images": 10, "refit_interval_s": 0, "refit_growth": 0},
    "watch": {"rescan_interval_s": 0},
}


# ---- the folder tree


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = write_config(root, OVERRIDES)
        self.inbox = root / "inbox"
        self.library = root / "library"
        self.stage = root / "stage"  # same filesystem, outside the inbox
        for d in (self.inbox, self.library, self.stage, root / "quarantine"):
            d.mkdir(parents=True, exist_ok=True)
        self.daemon = DaemonProcess(self.config)

    def inbox_count(self) -> int:
        with os.scandir(self.inbox) as it:
            return sum(1 for _ in it)

    def library_count(self) -> int:
        n = 0
        with os.scandir(self.library) as folders:
            for f in folders:
                if f.is_dir():
                    with os.scandir(f.path) as it:
                        n += sum(1 for _ in it)
        return n

    def filed(self, name: str) -> bool:
        """Gone from the inbox and present in a cluster folder."""
        if os.path.lexists(self.inbox / name):
            return False
        with os.scandir(self.library) as folders:
            return any(os.path.lexists(os.path.join(f.path, name)) for f in folders)

    def check_alive(self) -> None:
        if not self.daemon.alive():
            raise SystemExit(f"the daemon died:\n{self.daemon.log_tail()}")


def wait_filed(b: Bench, name: str, timeout: float = 120) -> float:
    """Poll every POLL_S until `name` is filed; return the perf_counter time it was seen."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if b.filed(name):
            return now
        if now > deadline:
            b.check_alive()
            raise SystemExit(f"{name} not filed within {timeout:g} s:\n{b.daemon.log_tail()}")
        time.sleep(POLL_S)


def settle(b: Bench, expect_library: int, timeout: float = 120) -> None:
    """Inbox empty, library at the expected count, and a moment for the last commits."""
    def done() -> bool:
        b.check_alive()
        return b.inbox_count() == 0 and b.library_count() >= expect_library

    wait_until(done, timeout, f"inbox empty and {expect_library} filed",
               on_timeout=b.daemon.log_tail)
    time.sleep(0.2)  # finish_move / cluster size commits come after the file is in place


# ---- (1) latency


def seed(b: Bench) -> None:
    ph = photos()
    chosen = ph[::2][:SEEDS]  # 4 of each of the 5 classes
    for i, p in enumerate(chosen):
        tmp = b.stage / f"seed{i:02d}_{p.parent.name}_{p.name}"
        shutil.copyfile(p, tmp)
        os.rename(tmp, b.inbox / tmp.name)
    settle(b, SEEDS, timeout=300)


def single_rename(b: Bench, src: Path, name: str) -> float:
    tmp = b.stage / name
    shutil.copyfile(src, tmp)
    t0 = time.perf_counter()
    os.rename(tmp, b.inbox / name)
    return wait_filed(b, name) - t0


def single_copy(b: Bench, src: Path, name: str) -> float:
    shutil.copy(src, b.inbox / name)
    t0 = time.perf_counter()  # the copy has closed the file: its close event is on its way
    return wait_filed(b, name) - t0


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def latency(b: Bench, files: Sequence[Path], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"rename": [], "copy": []}
    for i in range(n):
        # Alternate the two ways so that drift on the machine hits both alike.
        for how in ("rename", "copy"):
            src = files[(2 * i + (how == "copy")) % len(files)]
            name = f"{how}{i:03d}_{src.parent.name}_{src.name}"
            fn = single_rename if how == "rename" else single_copy
            out[how].append(fn(b, src, name))
            time.sleep(0.1)  # let the daemon finish its commits: each drop meets it idle
    return out


# ---- (2) burst and sort


def stage_burst(b: Bench, files: Sequence[Path], n: int, tag: str) -> list[str]:
    folder = b.stage / tag
    folder.mkdir()
    names = []
    for i in range(n):
        src = files[i % len(files)]
        name = f"{tag}_{i:05d}_{src.parent.name}_{src.name}"
        shutil.copyfile(src, folder / name)
        names.append(name)
    os.sync()  # no writeback of the staging copies during the timed drain
    return names


def burst(b: Bench, names: Sequence[str], tag: str) -> dict[str, float]:
    folder = b.stage / tag
    before = b.library_count()
    n = len(names)
    log_start = len(b.daemon.log())
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for name in names:
        os.rename(folder / name, b.inbox / name)
    dropped = time.perf_counter() - t0
    deadline = t0 + 900
    while True:
        now = time.perf_counter()
        left = b.inbox_count()
        samples.append((now - t0, left))
        if left == 0 and b.library_count() >= before + n:
            break
        if now > deadline:
            raise SystemExit(f"burst not drained in 900 s:\n{b.daemon.log_tail()}")
        if len(samples) % 50 == 0:
            b.check_alive()
        time.sleep(BURST_POLL_S)
    wall = samples[-1][0]
    folder.rmdir()

    # Steady rate: from 10 % to 90 % drained (start-up of the batch and the tail excluded).
    def first_time(left_at_most: int) -> float:
        return next(t for t, left in samples if left <= left_at_most)

    t10, t90 = first_time(int(n * 0.9)), first_time(int(n * 0.1))
    steady = (0.8 * n) / (t90 - t10) if t90 > t10 else float("nan")
    first_out = first_time(n - 1)
    log_rate, log_ms = log_stats(b.daemon.log()[log_start:], tag)
    time.sleep(0.2)
    return {"wall_s": wall, "rate": n / wall, "steady_rate": steady, "drop_s": dropped,
            "first_filed_s": first_out, "log_rate": log_rate, "log_median_ms": log_ms}


def log_stats(text: str, tag: str) -> tuple[float, float]:
    """(files/s between the first and last 'sorted' line of this burst, median of the
    per-file arrival-to-sorted ms the daemon logs)."""
    stamps, ms = [], []
    for line in text.splitlines():
        m = SORTED_LINE.match(line)
        if m and m.group(4).startswith(tag + "_"):
            h, mi, s = (int(m.group(i)) for i in (1, 2, 3))
            stamps.append(h * 3600 + mi * 60 + s)
            ms.append(float(m.group(5)))
    if len(stamps) < 2:
        return float("nan"), float("nan")
    span = (stamps[-1] - stamps[0]) % 86400 + 1  # whole seconds, both ends included
    return len(stamps) / span, statistics.median(ms)


def sort_run(src: Path, work: Path, n: int, tag: str) -> dict[str, float]:
    cfg = work / "sort-config.yaml"
    # The daemon's model and decode settings (both default here), CPU only like the daemon.
    cfg.write_text('model:\n  gpu: "off"\n')
    dest = work / f"sorted-{tag}"
    run, reported = benchlib.run_segd_sort(src, dest, cfg, n, extra=["--k", "5"])
    shutil.rmtree(dest)
    return {"wall_s": run.wall_s, "rate": n / run.wall_s, "embed_rate": reported}


# ---- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="folder of images (default: the distinct five of clothing10)")
    ap.add_argument("--burst", type=int, default=1000, help="files per burst")
    ap.add_argument("--singles", type=int, default=50, help="single drops per way")
    ap.add_argument("--repeats", type=int, default=2, help="burst/sort rounds")
    args = ap.parse_args()

    files = benchlib.list_images(args.data)
    if not files:
        raise SystemExit("no images found")
    # Classes interleaved, so consecutive single drops are not all of one class.
    by_class: dict[str, list[Path]] = {}
    for p in files:
        by_class.setdefault(p.parent.name, []).append(p)
    mixed = [p for group in zip(*by_class.values(), strict=False) for p in group] or files
    print(f"machine: {benchlib.machine()}; load average {benchlib.load_average()}")
    print(f"images: {len(files)} from {args.data or 'clothing10 distinct five'}; burst "
          f"{args.burst}, singles {args.singles} per way, {args.repeats} burst/sort rounds")
    benchlib.warm_page_cache(files)

    with tempfile.TemporaryDirectory(prefix="segd-bench-daemon-", dir="/tmp") as tmp:
        work = Path(tmp)
        b = Bench(work / "daemon")
        try:
            t = time.perf_counter()
            b.daemon.start(timeout=120)
            print(f"daemon ready in {time.perf_counter() - t:.1f} s", flush=True)
            t = time.perf_counter()
            seed(b)
            print(f"seeded with {SEEDS} photos, first fit and filing in "
                  f"{time.perf_counter() - t:.1f} s; clusters: "
                  f"{sorted(p.name for p in b.library.iterdir())}", flush=True)

            lat = latency(b, mixed, args.singles)
            for how, xs in lat.items():
                print(f"  single {how:6s}: median {statistics.median(xs) * 1000:6.1f} ms, "
                      f"p95 {pct(xs, 0.95) * 1000:6.1f} ms, max {max(xs) * 1000:6.1f} ms",
                      flush=True)

            burst_files = benchlib.list_images(args.data)
            src = work / "sort-src"
            src.mkdir()
            for i in range(args.burst):  # the same N files (same names) as each burst
                p = burst_files[i % len(burst_files)]
                shutil.copyfile(p, src / f"{i:05d}_{p.parent.name}_{p.name}")
            rounds: list[tuple[dict[str, float], dict[str, float]]] = []
            for r in range(args.repeats):
                tag = f"b{r + 1}"
                names = stage_burst(b, burst_files, args.burst, tag)
                br = burst(b, names, tag)
                print(f"  round {r + 1}: burst {br['rate']:6.1f} images/s (wall "
                      f"{br['wall_s']:.1f} s, steady {br['steady_rate']:.1f}/s, first filed "
                      f"{br['first_filed_s']:.2f} s, log {br['log_rate']:.1f}/s); load "
                      f"{benchlib.load_average()}", flush=True)
                sr = sort_run(src, work, args.burst, tag)
                print(f"  round {r + 1}: sort  {sr['rate']:6.1f} images/s (wall "
                      f"{sr['wall_s']:.1f} s, embedding phase {sr['embed_rate']:.1f}/s); "
                      f"load {benchlib.load_average()}", flush=True)
                rounds.append((br, sr))
            errors = b.daemon.errors_in_log()
            b.daemon.stop(timeout=60)
        finally:
            b.daemon.cleanup()

    def m(key: str, which: int) -> float:
        return statistics.median(r[which][key] for r in rounds)

    burst_rate, sort_rate = m("rate", 0), m("rate", 1)
    sort_embed = m("embed_rate", 1)
    result = {
        "bench": "daemon", "machine": benchlib.machine(), "images": len(files),
        "singles": args.singles, "burst": args.burst, "repeats": args.repeats,
        "latency_ms": {how: {"median": round(statistics.median(xs) * 1000, 1),
                             "p95": round(pct(xs, 0.95) * 1000, 1),
                             "max": round(max(xs) * 1000, 1)} for how, xs in lat.items()},
        "burst_images_per_s": round(burst_rate, 1),
        "burst_steady_images_per_s": round(m("steady_rate", 0), 1),
        "burst_wall_s": round(m("wall_s", 0), 2),
        "burst_first_filed_s": round(m("first_filed_s", 0), 2),
        "burst_log_images_per_s": round(m("log_rate", 0), 1),
        "sort_images_per_s": round(sort_rate, 1),
        "sort_wall_s": round(m("wall_s", 1), 2),
        "sort_embed_images_per_s": round(sort_embed, 1),
        "burst_over_sort": round(burst_rate / sort_rate, 2),
        "burst_steady_over_sort_embed": round(m("steady_rate", 0) / sort_embed, 2),
        "per_round": [{"burst": br, "sort": sr} for br, sr in rounds],
        "daemon_errors": len(errors),
    }

    print("\n| measure | median | p95 | max |")
    print("|---|---|---|---|")
    for how, xs in lat.items():
        label = "rename into the inbox" if how == "rename" else "shutil.copy into the inbox"
        print(f"| single file, {label}, ms | {statistics.median(xs) * 1000:.1f} | "
              f"{pct(xs, 0.95) * 1000:.1f} | {max(xs) * 1000:.1f} |")
    print(f"\n| {args.burst} files, median of {args.repeats} | images/s | wall s |")
    print("|---|---|---|")
    print(f"| daemon burst, drop to drained | {burst_rate:.1f} | {m('wall_s', 0):.1f} |")
    print(f"| daemon burst, steady (10-90 % drained) | {m('steady_rate', 0):.1f} | |")
    print(f"| `segd sort --k 5`, whole command | {sort_rate:.1f} | {m('wall_s', 1):.1f} |")
    print(f"| `segd sort`, its embedding phase | {sort_embed:.1f} | |")
    print(f"| **burst / sort** | **{burst_rate / sort_rate:.2f}** | |")
    print(f"| burst steady / sort embedding phase | {m('steady_rate', 0) / sort_embed:.2f} | |")
    if errors:
        print(f"\ndaemon log errors ({len(errors)}):\n" + "\n".join(errors[:10]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
