"""How fast the small commands answer, and how soon `segd sort` decodes its first image.

    .venv/bin/python bench/bench_commands.py [--runs N] [--sort-images N]

Whole processes, as a user starts them (`.venv/bin/segd`), medians of N runs, interleaved
so drift on a shared machine hits all alike:

    python -c pass                   the interpreter's own start: the floor
    segd --help
    segd status                      no store yet
    segd status (daemon, store)      a store of 949 images and a daemon answering on the
                                     control socket (a stand-in server in this process)

then `segd sort` on N photos with an empty cache: seconds from the start of the process to
its debug line "first image decoded" (read from its stderr as it is written). Goals:
`segd status` under 0.3 s, the first image decoded within 0.5 s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import numpy as np

from segd.service.control import ControlServer
from segd.state.store import open_store

PYTHON = benchlib.REPO / ".venv" / "bin" / "python"
DAEMON_ANSWER = {"ok": True, "status": {
    "pid": os.getpid(), "uptime_s": 60.0, "watch_mode": "inotify", "on_gpu": False,
    "providers": ["CPUExecutionProvider"], "gpu_fallback_reason": None, "queue_depth": 0,
    "in_flight": 0, "refit_running": False}}


def wall(cmd: Sequence[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(list(cmd), env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def make_store(state: Path, files: Sequence[Path]) -> None:
    store = open_store(state / "segd.db")
    try:
        rng = np.random.default_rng(0)
        with store.transaction():
            for i, p in enumerate(files):
                v = rng.standard_normal(1280).astype(np.float32)
                store.add_image(hashlib.sha256(str(p).encode()).hexdigest(), p.name,
                                state.parent / "inbox" / f"{i}.jpg", "pending",
                                embedding=v / np.linalg.norm(v))
    finally:
        store.close()


def first_decode(src: Path, dest: Path, config: Path, env: dict[str, str]) -> float:
    """Seconds from spawning `segd sort` to its 'first image decoded' line."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(benchlib.SEGD), "sort", str(src), str(dest), "--config",
                             str(config), "--no-progress", "--k", "3", "-v"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = None
    for line in proc.stderr:
        if seen is None and "first image decoded" in line:
            seen = time.perf_counter() - start
    if proc.wait() != 0 or seen is None:
        raise SystemExit("segd sort failed or never logged its first decoded image")
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--sort-images", type=int, default=64)
    ap.add_argument("--sort-runs", type=int, default=5)
    args = ap.parse_args()

    files = benchlib.list_images(None)
    print(f"machine: {benchlib.machine()}; load average {benchlib.load_average()}")
    with tempfile.TemporaryDirectory(prefix="segd-bench-cmd-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, XDG_CACHE_HOME=str(work / "xdg"))
        bare, full = work / "bare", work / "full"
        for folder in (bare, full):
            folder.mkdir()
            (folder / "config.yaml").write_text(
                'state_dir: state\nmodel:\n  gpu: "off"\n')
        (full / "state").mkdir()
        make_store(full / "state", files)
        cases = {
            "python -c pass": ([str(PYTHON), "-c", "pass"], bare),
            "segd --help": ([str(benchlib.SEGD), "--help"], bare),
            "segd status": ([str(benchlib.SEGD), "status"], bare),
            "segd status (daemon, store)": ([str(benchlib.SEGD), "status"], full),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        with ControlServer(full / "state" / "control.sock", lambda _: DAEMON_ANSWER):
            for _ in range(args.runs):
                for name, (cmd, cwd) in cases.items():
                    times[name].append(wall(cmd, env, cwd))

        src = benchlib.stage_flat(files[:args.sort_images], work / "src")
        benchlib.warm_page_cache(list(src.iterdir()))
        decode_s = []
        for i in range(args.sort_runs):
            run_env = dict(env, XDG_CACHE_HOME=str(work / f"xdg-sort-{i}"))  # empty each time
            decode_s.append(first_decode(src, work / f"sorted-{i}", bare / "config.yaml",
                                         run_env))

    floor = benchlib.median(times["python -c pass"])
    print(f"\n{'command':<30} {'median s':>9} {'min s':>7} {'x floor':>8}   ({args.runs} runs)")
    for name, values in times.items():
        med = benchlib.median(values)
        print(f"{name:<30} {med:9.3f} {min(values):7.3f} {med / floor:8.2f}")
    print(f"\nsegd sort, first image decoded: median {benchlib.median(decode_s):.3f} s, "
          f"min {min(decode_s):.3f} s after the process started ({args.sort_runs} runs, "
          f"{args.sort_images} images, empty cache)")
    print(f"load average after: {benchlib.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
