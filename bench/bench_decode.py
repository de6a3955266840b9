"""Decode throughput of segd.media.decode: one thread vs a pool, full vs reduced JPEG decoding.

    python bench/bench_decode.py [FOLDER] [--limit N] [--large N] [--phone N] [--rounds R]

FOLDER (default /work/shared/datasets/clothing10) is decoded as found. Its images are small, so
reduced (DCT-domain) decoding rarely applies there; to show that gain, the benchmark also
synthesises phone-sized (1200x1600, ~2 MP) and camera-sized (3000x4000, 12 MP) JPEGs from the
folder's own photos (upscaled, with sensor-like noise so they do not compress unrealistically
well) in a temporary directory.

Decoding goes through decode_file, i.e. includes reading the (page-cached) file, the header
checks, resizing to 160 px and the EXIF handling: the whole per-image cost before the network.
OpenCV releases the GIL in imdecode/resize, so a ThreadPoolExecutor over all cores is the
intended way to parallelise; the pool figures show how close that gets to linear.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from segd.media.decode import DecodeOptions, decode_file
from segd.media.formats import SUPPORTED_SUFFIXES

DEFAULT_FOLDER = Path("/work/shared/datasets/clothing10")


def list_images(folder: Path, limit: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES)
    return files[:limit] if limit > 0 else files


def synthesise(sources: Sequence[Path], out: Path, count: int, w: int, h: int) -> list[Path]:
    rng = np.random.default_rng(0)
    made = []
    for i in range(count):
        src = cv2.imread(str(sources[i % len(sources)]))
        img = cv2.resize(src, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img += rng.normal(0, 3, img.shape).astype(np.int16)  # sensor noise: realistic entropy
        path = out / f"synth_{w}x{h}_{i}.jpg"
        ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8),
                               [cv2.IMWRITE_JPEG_QUALITY, 90])  # fmt: skip
        assert ok
        path.write_bytes(buf.tobytes())
        made.append(path)
    return made


def run_once(files: Sequence[Path], opts: DecodeOptions, workers: int) -> float:
    """Seconds to decode all files once."""
    t0 = time.perf_counter()
    if workers == 1:
        for f in files:
            decode_file(f, opts)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(lambda f: decode_file(f, opts), files):
                pass
    return time.perf_counter() - t0


def bench_set(label: str, files: Sequence[Path], rounds: int) -> None:
    if not files:
        print(f"{label}: no images")
        return
    mb = sum(f.stat().st_size for f in files) / len(files) / 2**20
    cores = os.cpu_count() or 1
    for f in files:  # warm the page cache (and OpenCV) so round 1 is not an outlier
        f.read_bytes()
    decode_file(files[0], DecodeOptions())
    configs = [(mode, opts, w)
               for mode, opts in (("full", DecodeOptions(reduced_decode=False)),
                                  ("reduced", DecodeOptions()))
               for w in (1, cores)]  # fmt: skip
    best = {(mode, w): float("inf") for mode, _, w in configs}
    # Interleave the configurations round by round, keeping each one's best time, so that
    # load from other processes on a shared machine does not favour whichever ran last.
    for _ in range(rounds):
        for mode, opts, w in configs:
            best[(mode, w)] = min(best[(mode, w)], run_once(files, opts, w))
    r = {key: len(files) / t for key, t in best.items()}
    print(f"\n{label}: {len(files)} images, {mb:.2f} MiB each on average")
    print(f"  {'':10}{'1 thread':>12}{f'{cores} threads':>14}{'pool gain':>11}")
    for mode in ("full", "reduced"):
        one, many = r[(mode, 1)], r[(mode, cores)]
        print(f"  {mode:10}{one:9.1f}/s {many:11.1f}/s {many / one:9.2f}x"
              f"   ({1000 / one:.2f} ms/image single-threaded)")  # fmt: skip
    print(f"  reduced/full: {r[('reduced', 1)] / r[('full', 1)]:.2f}x single, "
          f"{r[('reduced', cores)] / r[('full', cores)]:.2f}x pooled")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    ap.add_argument("--limit", type=int, default=0, help="decode at most N files (0: all)")
    ap.add_argument("--phone", type=int, default=24, help="synthetic 1200x1600 JPEGs")
    ap.add_argument("--large", type=int, default=6, help="synthetic 3000x4000 JPEGs")
    ap.add_argument("--rounds", type=int, default=3, help="best of R timed rounds")
    ap.add_argument("--cv-threads", type=int, default=1,
                    help="cv2.setNumThreads value (default 1: one core per decode, so the pool\n"
                         "is the only parallelism; -1 keeps OpenCV's own default)")  # fmt: skip
    args = ap.parse_args()
    if args.cv_threads >= 0:
        # A benchmark is a caller, so it may set this global; segd.media.decode itself never does.
        cv2.setNumThreads(args.cv_threads)

    print(f"OpenCV {cv2.__version__}, cv2.getNumThreads()={cv2.getNumThreads()}, "
          f"cpu_count={os.cpu_count()}")  # fmt: skip
    files = list_images(args.folder, args.limit)
    bench_set(f"{args.folder}", files, args.rounds)
    if not files:
        return
    with tempfile.TemporaryDirectory() as d:
        phone = synthesise(files, Path(d), args.phone, 1200, 1600)
        bench_set("synthetic 1200x1600 JPEG (phone, 1.9 MP)", phone, args.rounds)
        large = synthesise(files, Path(d), args.large, 3000, 4000)
        bench_set("synthetic 3000x4000 JPEG (camera, 12 MP)", large, args.rounds)


if __name__ == "__main__":
    main()
