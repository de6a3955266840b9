"""`segd sort` against the original notebook recipe (bench/original_recipe.py), same photos.

    .venv/bin/python bench/bench_vs_recipe.py [--data DIR] [--limit N] [--repeats R]
                                              [--tf-python /tmp/tfenv/bin/python]

Both run as subprocesses on the same flat copy of the "distinct five" of clothing10 (949
photos) or of DIR, interleaved (the order alternates each repeat, so drift on a shared
machine hits both alike). The recipe needs TensorFlow: see bench/original_recipe.py for the
throwaway environment it runs in. Measured for each: wall time of the whole command
(start-up included) and the child's peak RSS (os.wait4 rusage, ru_maxrss). Prints medians
and the ratios; the goal is segd >= 10x faster at < 1/5 of the memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib

RECIPE = Path(__file__).resolve().parent / "original_recipe.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tf-python", default="/tmp/tfenv/bin/python")
    args = ap.parse_args()

    files = benchlib.list_images(args.data, args.limit)
    print(f"machine: {benchlib.machine()}; load average {benchlib.load_average()}")
    print(f"images: {len(files)} from {args.data or 'clothing10 distinct five'}; "
          f"{args.repeats} repeats, interleaved")
    results: dict[str, list[benchlib.ChildRun]] = {"recipe": [], "segd": []}
    with tempfile.TemporaryDirectory(prefix="segd-vs-recipe-") as tmp:
        work = Path(tmp)
        src = benchlib.stage_flat(files, work / "src")
        benchlib.warm_page_cache(list(src.iterdir()))
        cfg = work / "config.yaml"
        cfg.write_text('model:\n  gpu: "off"\n')  # no GPU here: say so, skip the warning
        commands = {
            "recipe": lambda d: [args.tf_python, str(RECIPE), str(src), str(d)],
            "segd": lambda d: [str(benchlib.SEGD), "sort", str(src), str(d), "--config",
                               str(cfg), "--no-progress", "--no-cache"],
        }
        for rep in range(args.repeats):
            order = ["recipe", "segd"] if rep % 2 == 0 else ["segd", "recipe"]
            for name in order:
                dest = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
                run = benchlib.run_child(commands[name](dest))
                if run.returncode != 0:
                    raise SystemExit(f"{name} failed ({run.returncode}):\n{run.stderr[-3000:]}")
                placed = sum(1 for p in dest.rglob("*") if p.is_file() and p.suffix != ".csv")
                if placed != len(files):
                    raise SystemExit(f"{name} placed {placed} of {len(files)} files")
                results[name].append(run)
                detail = ""
                if name == "recipe":
                    detail = " | " + " ".join(
                        ln for ln in run.stdout.splitlines() if ln.startswith("steps"))
                print(f"  repeat {rep + 1} {name:6s}: {run.wall_s:6.1f} s, "
                      f"peak RSS {run.peak_rss_mb:6.0f} MiB{detail}", flush=True)

    med = {name: (benchlib.median([r.wall_s for r in runs]),
                  benchlib.median([r.peak_rss_mb for r in runs]))
           for name, runs in results.items()}
    (rt, rm), (st, sm) = med["recipe"], med["segd"]
    print("\nmedians")
    print(f"  original recipe (TensorFlow, 224 px)   {rt:7.1f} s   {rm:7.0f} MiB peak RSS")
    print(f"  segd sort (onnxruntime, 160 px)        {st:7.1f} s   {sm:7.0f} MiB peak RSS")
    print(f"  speed-up  recipe / segd  {rt / st:6.1f}x   (goal >= 10x)")
    print(f"  memory    segd / recipe  {sm / rm:6.2f}    (goal < 0.20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
