"""`segd doctor`: why the GPU is (not) used, and how fast the model runs here.

Users' most common complaint about GPU inference tools is a GPU silently left idle, so this
names every missing piece: the onnxruntime build, each CUDA/cuDNN library that fails to
load, the driver, and what the session really ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING, Any

from segd.core.errors import SegdError

if TYPE_CHECKING:
    from segd.config import Config
    from segd.media.embed import Embedder

# Every module the checks need is imported by the check itself: the parser of every
# command imports this one, and `segd --help` must not pay for them.

# The shared libraries the CUDA provider of onnxruntime-gpu 1.2x/1.3x needs (CUDA 12 or 13).
CUDA_LIBRARIES = {
    "CUDA runtime": ("libcudart.so.13", "libcudart.so.12"),
    "cuBLAS": ("libcublas.so.13", "libcublas.so.12"),
    "cuBLASLt": ("libcublasLt.so.13", "libcublasLt.so.12"),
    "cuFFT": ("libcufft.so.12", "libcufft.so.11"),
    "cuRAND": ("libcurand.so.10",),
    "cuDNN 9": ("libcudnn.so.9",),
    "NVIDIA driver": ("libcuda.so.1",),
}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("doctor", parents=[common], help="check onnxruntime, the GPU and the model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace, config: Config) -> int:
    return doctor_command(config, as_json=args.json)


def onnxruntime_distributions() -> list[str]:
    import importlib.metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def check_libraries() -> dict[str, str]:
    """Each library: 'ok (name)' or 'missing: tried a, b'."""
    import ctypes

    result = {}
    for what, names in CUDA_LIBRARIES.items():
        for name in names:
            try:
                ctypes.CDLL(name)
                result[what] = f"ok ({name})"
                break
            except OSError:
                continue
        else:
            result[what] = "missing: tried " + ", ".join(names)
    return result


def gpu_devices() -> list[dict[str, str]]:
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total,memory.used,driver_version",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    keys = ("index", "name", "memory_total", "memory_used", "driver")
    return [dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
            for line in out.stdout.strip().splitlines() if line.strip()]


def driver_version() -> str | None:
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            return fh.readline().strip()
    except OSError:
        return None


def timed_run(embedder: Embedder, batch: int = 32, repeats: int = 5) -> dict[str, float]:
    import numpy as np

    size = embedder.input_size
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    embedder.embed(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.embed(images)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"batch": batch, "best_ms": round(best * 1000, 2),
            "images_per_s": round(batch / best, 1)}


def collect(config: Config) -> dict[str, Any]:
    from segd.media.embed import Embedder, import_onnxruntime

    report: dict[str, Any] = {}
    ort = import_onnxruntime()
    dists = onnxruntime_distributions()
    report["onnxruntime"] = {"version": ort.__version__, "build_device": ort.get_device(),
                             "installed": dists,
                             "available_providers": ort.get_available_providers()}
    if len(dists) > 1:
        report["problems"] = [f"several onnxruntime builds are installed ({', '.join(dists)}): "
                              "they overwrite each other's files; uninstall all and install "
                              "one ('segd[cpu]' or 'segd[gpu]')"]
    report["driver"] = driver_version()
    report["gpus"] = gpu_devices()
    report["config_gpu_policy"] = config.model.gpu
    runs = {}
    for precision in ("fp32", "fp16"):
        try:
            embedder = Embedder(config.model.path, model_name=config.model.name,
                                gpu=config.model.gpu, precision=precision,
                                threads=config.model.threads, input_size=config.model.input_size)
        except SegdError as exc:
            runs[precision] = {"error": str(exc)}
            continue
        runs[precision] = {"active_providers": list(embedder.report.active),
                           "on_gpu": embedder.report.on_gpu,
                           "gpu_not_used_because": embedder.report.fallback_reason,
                           "model": embedder.spec.path.name, **timed_run(embedder)}
        if not embedder.report.on_gpu:
            break  # fp16 runs only on the GPU; the CPU would repeat the fp32 figure
    report["model_runs"] = runs
    # After the sessions: they preload CUDA/cuDNN from the nvidia-* wheels when installed,
    # and a library already loaded that way is found by its name here.
    report["cuda_libraries"] = check_libraries()
    report["cpu_cores"] = len(os.sched_getaffinity(0))
    return report


def doctor_command(config: Config, *, as_json: bool) -> int:
    report = collect(config)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    o = report["onnxruntime"]
    print(f"onnxruntime:  {o['version']} ({o['build_device']} build; installed: "
          f"{', '.join(o['installed']) or 'none found by pip metadata'})")
    print(f"providers:    available in this build: {', '.join(o['available_providers'])}")
    for problem in report.get("problems", []):
        print(f"PROBLEM:      {problem}")
    print(f"driver:       {report['driver'] or 'no NVIDIA driver found (/proc/driver/nvidia)'}")
    if report["gpus"]:
        for gpu in report["gpus"]:
            print(f"GPU {gpu['index']}:        {gpu['name']}, {gpu['memory_total']} "
                  f"({gpu['memory_used']} used), driver {gpu.get('driver', '?')}")
    else:
        print("GPU:          none visible (nvidia-smi absent or found no device)")
    print("CUDA libraries:")
    for what, state in report["cuda_libraries"].items():
        print(f"  {what:<14} {state}")
    for precision, run in report["model_runs"].items():
        if "error" in run:
            print(f"model {precision}:   ERROR: {run['error']}")
            continue
        where = "GPU" if run["on_gpu"] else "CPU"
        providers = ", ".join(run["active_providers"])
        print(f"model {precision}:   {run['model']} on {where} ({providers}): "
              f"{run['images_per_s']} images/s at batch {run['batch']}")
        if run["gpu_not_used_because"]:
            print(f"              GPU NOT USED: {run['gpu_not_used_because']}")
    print(f"CPU cores:    {report['cpu_cores']}")
    return 0
