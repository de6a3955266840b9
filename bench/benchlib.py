"""Helpers shared by the benchmark scripts (not part of segd).

Kept free of segd imports so that the scripts can list files, stage a folder and measure a
child process before deciding which interpreter runs what.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATASET = Path("/work/shared/datasets/clothing10")
# The five classes that look nothing alike (see the dataset's README): 949 photos.
DISTINCT_FIVE = ("dress", "hat", "pants", "shoes", "t-shirt")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
REPO = Path(__file__).resolve().parent.parent
SEGD = REPO / ".venv" / "bin" / "segd"


def list_images(data: Path | None, limit: int = 0) -> list[Path]:
    """The distinct five of clothing10 (data None), else every image under `data`, sorted."""
    if data is None:
        files = [p for c in DISTINCT_FIVE for p in sorted((DATASET / c).iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit] if limit > 0 else files


def stage_flat(files: Sequence[Path], folder: Path) -> Path:
    """Copy the files into one flat folder (parent name prefixed): the input of a sort."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copyfile(p, folder / f"{p.parent.name}__{p.name}")
    return folder


def warm_page_cache(files: Sequence[Path]) -> None:
    for p in files:
        p.read_bytes()


@dataclass
class ChildRun:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run_child(cmd: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> ChildRun:
    """Run a command; wall time and that one child's peak RSS (os.wait4's rusage).

    Note: ru_maxrss is the peak of the process itself (the largest of its own children when
    it spawns any is not included); the benchmarked commands do their work in-process.
    """
    out_path = Path(f"/tmp/segd-bench-{os.getpid()}.out")
    err_path = Path(f"/tmp/segd-bench-{os.getpid()}.err")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    run = ChildRun(wall, usage.ru_maxrss / 1024, proc.returncode,
                   out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))
    out_path.unlink()
    err_path.unlink()
    return run


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return f"{cores} cores (nproc), {model}, Python {platform.python_version()}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_segd_sort(src: Path, dest: Path, config: Path, n: int,
                  extra: Sequence[str] = ()) -> tuple[ChildRun, float]:
    """Run `segd sort` as a child, check it placed all n images, and return the run and the
    embedding rate it reports (images/s). --no-cache: every run embeds afresh."""
    run = run_child([str(SEGD), "sort", str(src), str(dest), "--config", str(config),
                     "--no-progress", "--no-cache", *extra])
    if run.returncode != 0:
        raise SystemExit(f"segd sort failed ({run.returncode}):\n{run.stderr[-2000:]}")
    placed = sum(1 for p in dest.rglob("*") if p.is_file() and p.suffix != ".csv")
    if placed != n:
        raise SystemExit(f"segd sort placed {placed} of {n} images")
    reported = float("nan")
    for line in run.stdout.splitlines():
        if "images/s embedded" in line:
            reported = float(line.split("s, ")[1].split(" images/s")[0])
    return run, reported
