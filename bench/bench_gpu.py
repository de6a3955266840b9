"""Throughput and latency of segd on whatever this machine has, GPU or CPU, in one run.

    python bench/bench_gpu.py [--out results.json] [--photos N]

1. the network alone: images/s at batch 1..256, fp32 against fp16, with and without IO
   binding (on the CPU: a shorter sweep, fp32 only);
2. decoding alone on every core, on phone-sized JPEGs (1200x1600) made from the test photos;
3. `segd sort` end to end on the same files (all cores decoding, the network batching);
4. drop-to-sorted latency of single files through a real `segd run` daemon.

The same script gives the CPU figures on a machine without a GPU, for the comparison in
docs/gpu.md. It needs only the repository (no shared data set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from segd.batch.sort import SortOptions, run_sort
from segd.core.cluster import FitParams
from segd.media.decode import DecodeOptions, decode_file
from segd.media.embed import Embedder, cpu_count

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "photos"


def network_sweep(on_gpu: bool) -> list[dict]:
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256] if on_gpu else [1, 8, 32, 64]
    precisions = ["fp32", "fp16"] if on_gpu else ["fp32"]
    bindings = ["off", "on"]
    rows = []
    for precision in precisions:
        for binding in bindings:
            emb = Embedder(gpu="preferred", precision=precision, io_binding=binding)
            rng = np.random.default_rng(0)
            for batch in batches:
                x = rng.integers(0, 256, (batch, emb.input_size, emb.input_size, 3),
                                 dtype=np.uint8)
                emb.embed(x)  # warm-up for this shape
                times = []
                deadline = time.perf_counter() + (1.0 if on_gpu else 2.0)
                while len(times) < 3 or time.perf_counter() < deadline:
                    start = time.perf_counter()
                    emb.embed(x)
                    times.append(time.perf_counter() - start)
                    if len(times) >= 200:
                        break
                best = statistics.median(times)
                rows.append({"precision": precision, "io_binding": binding, "batch": batch,
                             "ms_per_batch": round(best * 1000, 3),
                             "images_per_s": round(batch / best, 1),
                             "providers": list(emb.report.active)})
                print(f"network {precision} binding={binding:<3} batch {batch:4d}: "
                      f"{batch / best:9.1f} images/s ({best * 1000:.2f} ms)", flush=True)
    return rows


def make_phone_photos(folder: Path, count: int) -> list[Path]:
    """Phone-sized JPEGs (1200x1600, quality 90) from the CC0 test photos."""
    sources = sorted(PHOTOS.glob("*/*.jpg"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        img = cv2.imread(str(src))
        img = cv2.resize(img, (1200, 1600), interpolation=cv2.INTER_CUBIC)
        if i // len(sources) % 2:
            img = img[:, ::-1]
        noise = rng.normal(0, 3, img.shape).astype(np.int16)
        img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        path = folder / f"{src.parent.name}_{i:05d}.jpg"
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(path)
    return out


def decode_rate(files: list[Path]) -> float:
    opts = DecodeOptions()
    start = time.perf_counter()
    with ThreadPoolExecutor(cpu_count()) as pool:
        for _ in pool.map(lambda p: decode_file(p, opts), files):
            pass
    return len(files) / (time.perf_counter() - start)


def sort_rate(files: list[Path], work: Path, precision: str) -> dict:
    embedder = Embedder(gpu="preferred", precision=precision)
    dest = work / f"sorted-{precision}"
    opts = SortOptions(src=files[0].parent, dest=dest, fit=FitParams(k=5), batch_size=64,
                       progress=False)
    result = run_sort(opts, embedder)
    shutil.rmtree(dest)
    return {"precision": precision, "images": len(files),
            "embed_images_per_s": round(len(files) / result.embed_seconds, 1),
            "total_s": round(result.seconds, 2), "on_gpu": embedder.report.on_gpu}


def daemon_latency(work: Path, seeds: list[Path], probes: list[Path]) -> dict:
    base = work / "daemon"
    base.mkdir()
    (base / "config.yaml").write_text(
        "allow_root: true\nclustering: {min_images: 10, refit_interval_s: 0, refit_growth: 0}\n"
        "watch: {rescan_interval_s: 0}\nlog_level: WARNING\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "segd", "run", "--config",
                             str(base / "config.yaml")], env=env, stderr=subprocess.DEVNULL)
    inbox, library = base / "inbox", base / "library"
    try:
        _wait(lambda: inbox.is_dir() and (base / "state" / "control.sock").exists(), 120)
        for p in seeds:
            shutil.copy(p, inbox / p.name)
        _wait(lambda: not any(inbox.iterdir()) and library.is_dir(), 120)
        latencies = []
        for p in probes:
            staging = base / f".{p.name}"
            shutil.copy(p, staging)
            start = time.perf_counter()
            os.rename(staging, inbox / f"probe-{p.name}")
            _wait(lambda: not any(inbox.iterdir()), 30, step=0.002)
            latencies.append((time.perf_counter() - start) * 1000)
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    latencies.sort()
    return {"files": len(latencies), "median_ms": round(statistics.median(latencies), 1),
            "p95_ms": round(latencies[max(0, int(0.95 * len(latencies)) - 1)], 1)}


def _wait(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(step)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--photos", type=int, default=0, help="phone photos to make "
                        "(default 3000 on a GPU, 300 on the CPU)")
    args = parser.parse_args()

    probe = Embedder(gpu="preferred")
    on_gpu = probe.report.on_gpu
    results: dict = {"device": "GPU" if on_gpu else "CPU", "providers": list(probe.report.active),
                     "cpu_cores": cpu_count(), "fallback_reason": probe.report.fallback_reason}
    print(json.dumps(results), flush=True)
    results["network"] = network_sweep(on_gpu)

    with tempfile.TemporaryDirectory(prefix="segd-bench-gpu-") as tmp:
        work = Path(tmp)
        count = args.photos or (3000 if on_gpu else 300)
        files = make_phone_photos(work / "photos", count)
        results["decode_images_per_s"] = round(decode_rate(files), 1)
        print(f"decode (1200x1600 JPEG, {cpu_count()} threads): "
              f"{results['decode_images_per_s']} images/s", flush=True)
        results["sort"] = [sort_rate(files, work, p) for p in (["fp32", "fp16"] if on_gpu
                                                                 else ["fp32"])]
        for row in results["sort"]:
            print(f"segd sort end to end ({row['precision']}): {row['embed_images_per_s']} "
                  f"images/s", flush=True)
        seeds = sorted(PHOTOS.glob("*/*.jpg"))[:20]
        results["latency"] = daemon_latency(work, seeds, files[:20])
        print(f"drop-to-sorted latency: median {results['latency']['median_ms']} ms, "
              f"p95 {results['latency']['p95_ms']} ms", flush=True)

    best_net = max(r["images_per_s"] for r in results["network"])
    e2e = max(r["embed_images_per_s"] for r in results["sort"])
    results["limits"] = {
        "network_best_images_per_s": best_net,
        "decode_images_per_s": results["decode_images_per_s"],
        "end_to_end_over_slower_stage": round(e2e / min(best_net,
                                                        results["decode_images_per_s"]), 2),
        "limited_by": "decoding" if results["decode_images_per_s"] < best_net else "network",
    }
    print(json.dumps(results["limits"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
