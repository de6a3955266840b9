"""Load on the real daemon: a burst of 10,000 files, then a steady arrival soak.

    .venv/bin/python bench/soak.py [--burst 10000] [--minutes 30] [--rate 5]
                                   [--sample-s 5] [--workdir DIR] [--keep] [--out FILE]

(1) burst: `--burst` photos (the 40 test photos under distinct names) are copied into the
    inbox as fast as one writer can; measured: the time until the inbox is empty and every
    file is filed, files/s.
(2) soak: `--rate` photos per second for `--minutes`, paced evenly; measured each minute:
    files dropped and filed, and the inbox backlog; throughput "held" means every file was
    filed within the run and the backlog never grew past one minute of arrivals.

All along, the daemon's RSS is read from /proc/PID/status (VmRSS) every `--sample-s`
seconds: printed are the peak, and the slope of a least-squares line through the soak's
samples after its first minute (MiB per hour): "flat" means under 5 MiB/h, or the line
rising less than 5 % of the peak over the whole soak.

Ends with the invariant (tests/support/invariant.py): every file dropped is exactly once in the
library, the quarantine or the inbox, byte-identical, and the store agrees with the disk.
--minutes 0 runs the burst alone; --burst 0 the soak alone. The soak's default (30 min)
is for a dedicated run; the figures in docs/reliability.md say which length they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

from daemon_harness import photos  # noqa: E402
from reliability_env import Env  # noqa: E402

CONFIG: dict[str, Any] = {
    # INFO: the harness waits for the "watching" line; one line per file costs little.
    "log_level": "INFO",
    "watch": {"rescan_interval_s": 60.0},
}


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, int]] = []  # (monotonic, KiB)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            kib = rss_kib(self.pid)
            if kib:
                self.samples.append((time.monotonic(), kib))
            self.stop_event.wait(self.every)


def slope_mib_per_h(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return 0.0
    t0 = samples[0][0]
    xs = [(t - t0) / 3600 for t, _ in samples]
    ys = [k / 1024 for _, k in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def burst(env: Env, n: int) -> dict[str, Any]:
    ph = photos()
    before = env.filed()
    t0 = time.monotonic()
    for i in range(n):
        env.copy([ph[i % len(ph)]], f"burst{i:05d}_")
    written = time.monotonic() - t0
    env.tree.wait_drained(before + n, max(600, n / 2), env.daemon)
    took = time.monotonic() - t0
    return {"files": n, "write_s": round(written, 1), "drain_s": round(took, 1),
            "files_per_s": round(n / took, 1)}


def soak(env: Env, minutes: float, rate: float) -> dict[str, Any]:
    ph = photos()
    before = env.filed()
    start = time.monotonic()
    end = start + minutes * 60
    dropped = 0
    per_minute: list[dict[str, Any]] = []
    max_backlog = 0
    next_minute = start + 60
    minute_drop0, minute_filed0 = 0, before
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) * rate) + 1
        while dropped < due:
            env.copy([ph[dropped % len(ph)]], f"soak{dropped:06d}_")
            dropped += 1
        backlog = len(env.tree.inbox_files())
        max_backlog = max(max_backlog, backlog)
        if now >= next_minute:
            filed = env.filed()
            per_minute.append({"minute": len(per_minute) + 1, "dropped": dropped - minute_drop0,
                               "filed": filed - minute_filed0, "backlog": backlog})
            print(f"  soak minute {len(per_minute)}: {per_minute[-1]}", flush=True)
            minute_drop0, minute_filed0 = dropped, filed
            next_minute += 60
        time.sleep(max(0.0, start + due / rate - time.monotonic()))
    env.tree.wait_drained(before + dropped, 600, env.daemon)
    drained_after = time.monotonic() - end
    held = max_backlog <= max(10, rate * 60)
    return {"minutes": minutes, "rate_per_s": rate, "files": dropped,
            "max_backlog": max_backlog, "drained_s_after_last_drop": round(drained_after, 1),
            "throughput_held": held, "per_minute": per_minute}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=10_000)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=5.0, help="files per second in the soak")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = ap.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="segd-soak-"))
    env = Env(root / "segd", CONFIG)
    result: dict[str, Any] = {}
    try:
        env.daemon.start(timeout=120)
        sampler = Sampler(env.daemon.pid, args.sample_s)
        sampler.start()
        env.seed(40)
        if args.burst:
            result["burst"] = burst(env, args.burst)
            result["burst"]["peak_rss_mib"] = round(max(k for _, k in sampler.samples) / 1024, 1)
            print(f"burst: {result['burst']}", flush=True)
        if args.minutes:
            mark = len(sampler.samples)
            result["soak"] = soak(env, args.minutes, args.rate)
            soak_samples = sampler.samples[mark:]
            t0 = soak_samples[0][0] if soak_samples else 0
            steady = [s for s in soak_samples if s[0] - t0 >= 60] or soak_samples
            peak = max(k for _, k in soak_samples) / 1024
            slope = slope_mib_per_h(steady)
            rise = slope * args.minutes / 60
            result["soak"].update({
                "rss_start_mib": round(soak_samples[0][1] / 1024, 1),
                "rss_end_mib": round(soak_samples[-1][1] / 1024, 1),
                "peak_rss_mib": round(peak, 1), "rss_slope_mib_per_h": round(slope, 2),
                "memory_flat": slope < 5 or rise < 0.05 * peak})
            print(f"soak: { {k: v for k, v in result['soak'].items() if k != 'per_minute'} }",
                  flush=True)
        sampler.stop_event.set()
        result["peak_rss_mib"] = round(max(k for _, k in sampler.samples) / 1024, 1)
        result["rss_samples"] = len(sampler.samples)
        summary = env.finish()
        result["invariant"] = summary.describe()
        print(f"[invariant] {summary.describe()}")
    finally:
        env.daemon.cleanup()
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
