"""Throughput of the embedding path: decode, network, the streaming pipeline, `segd sort`.

    .venv/bin/python bench/bench_throughput.py [--data DIR] [--limit N] [--repeats R]
                                               [--sweep] [--no-sort]

Images: the "distinct five" of clothing10 (dress, hat, pants, shoes, t-shirt; 949 photos),
or every image under DIR. Files are read once first so every stage sees a warm page cache.

    (a) decode alone: decode_file on a ThreadPoolExecutor with one thread per core
    (b) the network alone: Embedder(gpu="off").embed on pre-decoded batches of 32
    (c) embed_stream: decode + embed end to end, as `segd sort` and the daemon run it
    (d) `segd sort SRC DEST` as a subprocess (wall time incl. start-up and clustering,
        peak RSS of the child), and the images/s it reports for its embedding phase
    (e) the naive baseline: decode one image, embed it alone, next image

Prints medians over R repeats (stages interleaved within each repeat, so drift on a shared
machine hits them alike) and the ratios (c)/min(a,b), (d)/min(a,b), (c)/(e). The goal is
(c)/min(a,b) >= 0.8. On a machine where decode and network share the same cores, the
pipeline cannot beat the serial bound 1/(1/a + 1/b) either; that bound is printed too.

--sweep measures (c) under other thread settings: onnxruntime intra-op threads (0 = its
default, 1, 2), intra-op spinning on/off, decode workers (1, 2, one per core), and
cv2.setNumThreads(1), with each rate also as a ratio to segd's default setting measured in
the same sweep; then the network alone by batch size, and `segd sort` under model.threads
and decode.workers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib
import cv2
import numpy as np

from segd.core.pipeline import embed_stream
from segd.media.decode import DecodeOptions, decode_file
from segd.media.embed import Embedder, cpu_count

BATCH = 32
SWEEP_IMAGES = 320  # ten batches: enough to rank the settings, short enough for 24 of them


def make_embedder(threads: int = 0, spinning: bool = True) -> Embedder:
    """segd's Embedder; with spinning off, its session is rebuilt with that one option changed."""
    emb = Embedder(gpu="off", threads=threads, warmup=True)
    if not spinning:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        emb.session = ort.InferenceSession(emb.spec.path.read_bytes(), sess_options=options,
                                           providers=["CPUExecutionProvider"])
        emb.embed(np.zeros((1, emb.input_size, emb.input_size, 3), np.uint8))
    return emb


def decode_rate(files: Sequence[Path], opts: DecodeOptions, workers: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(lambda p: decode_file(p, opts), files):
            pass
    return len(files) / (time.perf_counter() - start)


def network_rate(emb: Embedder, images: np.ndarray) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), BATCH):
        emb.embed(images[i:i + BATCH])
    return len(images) / (time.perf_counter() - start)


def pipeline_rate(emb: Embedder, files: Sequence[Path], opts: DecodeOptions,
                  workers: int) -> float:
    start = time.perf_counter()
    n = 0
    for batch in embed_stream(files, lambda p: decode_file(p, opts), emb.embed,
                              batch_size=BATCH, workers=workers):
        n += sum(r.embedding is not None for r in batch)
    elapsed = time.perf_counter() - start
    assert n == len(files), f"only {n} of {len(files)} embedded"
    return n / elapsed


def naive_rate(emb: Embedder, files: Sequence[Path], opts: DecodeOptions) -> float:
    start = time.perf_counter()
    for p in files:
        emb.embed(decode_file(p, opts)[None])
    return len(files) / (time.perf_counter() - start)


def sort_run(src: Path, work: Path, n: int, threads: int = 0,
             workers: int = 0) -> tuple[float, float, float]:
    """(wall s, peak RSS MiB, images/s that segd sort reports for its embedding phase)."""
    cfg = work / f"config-t{threads}-w{workers}.yaml"
    cfg.write_text(f"model:\n  gpu: \"off\"\n  threads: {threads}\n"
                   f"decode:\n  workers: {workers}\n")
    dest = Path(tempfile.mkdtemp(prefix="sorted-", dir=work))
    run, reported = benchlib.run_segd_sort(src, dest, cfg, n)
    return run.wall_s, run.peak_rss_mb, reported


def med(xs: Sequence[float]) -> float:
    return benchlib.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="folder of images (default: the distinct five of clothing10)")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="try thread settings for (c)")
    ap.add_argument("--no-sort", action="store_true", help="skip (d)")
    args = ap.parse_args()

    files = benchlib.list_images(args.data, args.limit)
    cores = cpu_count()
    print(f"machine: {benchlib.machine()}; load average {benchlib.load_average()}")
    print(f"images: {len(files)} from {args.data or 'clothing10 distinct five'}; "
          f"batch {BATCH}; cv2 threads {cv2.getNumThreads()}; {args.repeats} repeats (medians)")
    benchlib.warm_page_cache(files)
    opts = DecodeOptions()
    emb = make_embedder()
    decoded = np.stack([decode_file(p, opts) for p in files])

    with tempfile.TemporaryDirectory(prefix="segd-bench-") as tmp:
        work = Path(tmp)
        src = benchlib.stage_flat(files, work / "src")
        r: dict[str, list[float]] = {k: [] for k in ("a", "b", "c", "e", "d_wall", "d_rss",
                                                     "d_rate")}
        for rep in range(args.repeats):
            r["a"].append(decode_rate(files, opts, cores))
            r["b"].append(network_rate(emb, decoded))
            r["c"].append(pipeline_rate(emb, files, opts, cores))
            r["e"].append(naive_rate(emb, files, opts))
            if not args.no_sort:
                wall, rss, rate = sort_run(src, work, len(files))
                r["d_wall"].append(wall)
                r["d_rss"].append(rss)
                r["d_rate"].append(rate)
            print(f"  repeat {rep + 1}: a={r['a'][-1]:.0f} b={r['b'][-1]:.0f} "
                  f"c={r['c'][-1]:.0f} e={r['e'][-1]:.0f}"
                  + ("" if args.no_sort else f" d={len(files) / r['d_wall'][-1]:.0f} "
                     f"(wall {r['d_wall'][-1]:.1f} s)"), flush=True)

        a, b, c, e = med(r["a"]), med(r["b"]), med(r["c"]), med(r["e"])
        bound = min(a, b)
        serial = 1 / (1 / a + 1 / b)
        print("\nimages/s (median)")
        print(f"  (a) decode alone, {cores} threads          {a:8.1f}")
        print(f"  (b) network alone, batch {BATCH}           {b:8.1f}")
        print(f"  (c) embed_stream decode+embed          {c:8.1f}")
        if not args.no_sort:
            d_wall = med(r["d_wall"])
            d = len(files) / d_wall
            print(f"  (d) segd sort, whole command           {d:8.1f}   "
                  f"(wall {d_wall:.1f} s, peak RSS {med(r['d_rss']):.0f} MiB; "
                  f"its embedding phase: {med(r['d_rate']):.1f} images/s)")
        print(f"  (e) naive, one image at a time         {e:8.1f}")
        print(f"  min(a, b) = {bound:.1f}; serial bound 1/(1/a+1/b) = {serial:.1f} "
              "(decode and network on the same cores)")
        print("\nratios")
        print(f"  (c) / min(a, b)      {c / bound:6.2f}   (goal >= 0.8)")
        print(f"  (c) / serial bound   {c / serial:6.2f}")
        if not args.no_sort:
            print(f"  (d) / min(a, b)      {d / bound:6.2f}   whole command, start-up and "
                  "clustering included")
            print(f"  (d embed) / min(a,b) {med(r['d_rate']) / bound:6.2f}   "
                  "embedding phase as segd sort reports it")
        print(f"  (c) / (e)            {c / e:6.2f}   pipeline vs naive")

        if args.sweep:
            sweep(files, opts, decoded, cores, args.repeats, bound, src, work, args.no_sort)
    return 0


def sweep(files: Sequence[Path], opts: DecodeOptions, decoded: np.ndarray, cores: int,
          repeats: int, bound: float, src: Path, work: Path, no_sort: bool) -> None:
    print("\nsweep: (c) embed_stream images/s under thread settings (median of "
          f"{repeats}; network alone (b) with the same session in brackets)")
    files = files[:SWEEP_IMAGES]
    decoded = decoded[:SWEEP_IMAGES]
    print(f"  (on the first {len(files)} images)")
    default_cv2 = cv2.getNumThreads()
    embedders = {(t, s): make_embedder(t, s) for t in (0, 1, 2) for s in (True, False)}
    rows: list[tuple[str, float, float]] = []
    settings: list[tuple[int, bool, int, int]] = []
    for (t, s) in embedders:
        for w in sorted({1, 2, cores}):
            for cvt in (default_cv2, 1):
                settings.append((t, s, w, cvt))
    results: dict[tuple[int, bool, int, int], list[float]] = {k: [] for k in settings}
    net: dict[tuple[int, bool], list[float]] = {k: [] for k in embedders}
    for _ in range(repeats):
        for key in embedders:
            net[key].append(network_rate(embedders[key], decoded))
        for (t, s, w, cvt) in settings:
            cv2.setNumThreads(cvt)
            try:
                results[(t, s, w, cvt)].append(pipeline_rate(embedders[(t, s)], files, opts, w))
            finally:
                cv2.setNumThreads(default_cv2)
    for key in settings:
        t, s, w, cvt = key
        label = (f"ort threads={t or 'default'} spinning={'on' if s else 'off'} "
                 f"workers={w} cv2 threads={cvt}")
        rows.append((label, med(results[key]), med(net[(t, s)])))
    # Ratios against segd's default setting measured in this same sweep (the load on a shared
    # machine drifts between the main measurement and the sweep).
    default = med(results[(0, True, cores, default_cv2)])
    for label, rate, n in sorted(rows, key=lambda x: -x[1]):
        print(f"  {label:58s} {rate:7.1f}  ({n:6.1f})  {rate / default:5.2f}x the default")
    print("\nsweep: network alone, images/s by batch size (median of "
          f"{repeats}), spinning on")
    for t in (0, 1, 2):
        cells = []
        for bs in (1, 8, 32):
            rates = []
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(0, len(decoded), bs):
                    embedders[(t, True)].embed(decoded[i:i + bs])
                rates.append(len(decoded) / (time.perf_counter() - start))
            cells.append(f"batch {bs:2d}: {med(rates):6.1f}")
        print(f"  ort threads={t or 'default'}: " + "   ".join(cells))
    if not no_sort:
        print("\nsweep: segd sort subprocess (config model.threads / decode.workers), "
              "whole-command images/s")
        n = sum(1 for _ in src.iterdir())  # the sort runs on every staged image
        for t, w in ((0, 0), (1, 0), (2, 0), (1, 1)):
            walls, rates = [], []
            for _ in range(repeats):
                wall, _, rate = sort_run(src, work, n, threads=t, workers=w)
                walls.append(wall)
                rates.append(rate)
            print(f"  model.threads={t} decode.workers={w}: wall {med(walls):5.1f} s "
                  f"({n / med(walls):5.1f} images/s), embedding phase {med(rates):5.1f} images/s")


if __name__ == "__main__":
    sys.exit(main())
